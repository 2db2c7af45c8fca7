#!/usr/bin/env bash
# Regenerates every report under reports/ on the default model and text (SmolLM2-135M,
# WikiText-2). Each report records the command that produced it.
#
#   bash scripts/make_reports.sh            # everything (about two and a half hours on 2 CPU cores)
#   bash scripts/make_reports.sh eval engines memory   # only the named steps
#
# Steps: headline (the presets on the test part of WikiText-2 and on the out-of-domain code text,
# 64 passages each: the README's headline rows), eval (HF, recommended preset), engines (codec-off HF vs vLLM), compare
# (compare-engines: the recommended preset under HF and vLLM), memory (KakeyaCache generation benchmark), calibration
# (ablation of Σ_q and centroids), throughput (codec benchmark), overhead (harness), entropy
# (uniform-ec under HF and vLLM and on held-out text, the two ~4.9x probes, the entropy-coding
# benchmark), scales (uniform-ec-log8: evaluation and held-out text, HF and vLLM; the
# V-step-everywhere probe with log8 scales), tune (the two kakeya tune searches on the log8 ladder,
# replayed from their records: the written policies and the greedy endpoints on the evaluation text,
# the KL search's endpoint, preset uniform-ec-log8-tuned, under HF and vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(eval engines compare memory calibration throughput overhead entropy scales tune)

run() {  # run NAME CMD...: the Markdown summary on stdout to reports/NAME.md
    local name=$1; shift
    echo "== $name: $*" >&2
    # vLLM's loggers print to stdout too: keep from the summary's heading on
    "$@" | sed -n '/^## kakeya/,$p' > "reports/$name.md"
}

for step in "${steps[@]}"; do
    case $step in
        headline)  # the README's headline rows: the test part only, 64 passages x (1024 + 256)
            mkdir -p reports/test
            for preset in model-basis-vlayers model-basis-layers model-basis recommended uniform-ec-log8-tuned uniform-ec-log8; do
                run "test/eval_${preset}" kakeya eval --config "$preset" --passages 64 \
                    --json "reports/test/eval_${preset}.json"
                run "test/eval_${preset}_code" kakeya eval --config "$preset" --text code --passages 64 \
                    --json "reports/test/eval_${preset}_code.json"
            done
            for text in wikitext code; do  # the model-basis presets under vLLM too
                for preset in model-basis-vlayers model-basis-layers model-basis; do
                    run "test/eval_${preset}_vllm_${text}" kakeya eval --engine vllm --config "$preset" --text "$text" \
                        --passages 64 --json "reports/test/eval_${preset}_vllm_${text}.json"
                done
            done ;;
        eval)
            run eval_recommended kakeya eval --json reports/eval_recommended.json ;;
        engines)
            run engines kakeya engines --json reports/engines.json ;;
        compare)
            run compare_engines kakeya compare-engines --config recommended --passages 16 --ctx 1024 \
                --n-eval 256 --json reports/compare_engines.json ;;
        memory)
            {
                echo "# KakeyaCache vs DynamicCache: generation memory and speed"
                echo
                echo '```'
                echo 'command: python benchmarks/generate_memory.py'
                python benchmarks/generate_memory.py
                echo '```'
            } > reports/generate_memory.md ;;
        calibration)
            python reports/calibration/make_ablation.py ;;
        throughput)
            {
                echo '# Codec throughput'
                echo
                echo 'Rust codec with its AVX2 dispatch, the same codec held to the baseline instruction set'
                echo '(same bytes), the numpy reference (tests/reference_codec.py) and a memory copy, measured in'
                echo 'one run on the same data; each Rust timing is the best of a window before and one after the'
                echo 'reference'"'"'s. With basis "pca" every block of 1024 tokens needs a DxD Gram matrix, its'
                echo 'eigendecomposition (kakeya/src/eigen.rs: Householder tridiagonalization, implicit QL, blocked'
                echo 'back transform) and a projection that also applies the rotation; the decoder folds the inverse'
                echo 'rotation into the basis, one product per block. The "GEMM floor" column is the two f32 matrix'
                echo 'products of every pca block alone (Gram matrix, full-rank projection) with numpy'"'"'s BLAS, and'
                echo '"floor x numpy" the most an encoder doing only them could gain over the reference; the'
                echo 'eigendecompositions come on top: "+eigh" adds LAPACK'"'"'s eigensolver (numpy.linalg.eigh, f32) on'
                echo 'every block'"'"'s Gram matrix, an encoder doing only the linear algebra with this machine'"'"'s BLAS'
                echo 'and LAPACK and no quantization. Absolute MB/s differ a lot between the virtual machines of'
                echo 'different sessions and within one session (memcpy too): compare the columns of one run.'
                echo
                echo '```'
                python benchmarks/codec_throughput.py --json reports/codec_throughput.json
                echo '```'
            } > reports/codec_throughput.md ;;
        overhead)
            {
                echo '# Harness overhead'
                echo
                echo '```'
                echo 'command: python benchmarks/harness_overhead.py --json reports/harness_overhead.json'
                python benchmarks/harness_overhead.py --json reports/harness_overhead.json
                echo '```'
            } > reports/harness_overhead.md ;;
        entropy)
            run entropy/compare_engines_uniform_ec kakeya compare-engines --config uniform-ec --passages 16 \
                --ctx 1024 --n-eval 256 --json reports/entropy/compare_engines_uniform_ec.json
            python reports/basis/calibration_text.py /tmp/wikitext2_calibration_part.txt
            run entropy/heldout16_uniform_ec kakeya eval --text-file /tmp/wikitext2_calibration_part.txt \
                --config uniform-ec --passages 16 --json reports/entropy/heldout16_uniform_ec.json
            run entropy/heldout16_v3_everywhere kakeya eval --text-file /tmp/wikitext2_calibration_part.txt \
                --config reports/entropy/probe_v3_everywhere.policy.json --passages 16 \
                --json reports/entropy/heldout16_v3_everywhere.json
            for probe in probe_k045_v064 probe_block_scale probe_v3_everywhere; do
                run "entropy/$probe" kakeya eval --config "reports/entropy/$probe.policy.json" \
                    --json "reports/entropy/$probe.json"
            done
            {
                echo '# Entropy coding: bytes, error and speed (synthetic K/V-like data)'
                echo
                echo '```'
                python benchmarks/entropy_coding.py --json reports/entropy/entropy_coding_benchmark.json
                echo '```'
            } > reports/entropy/entropy_coding_benchmark.md
            {
                echo '# KakeyaCache: recommended vs uniform-ec (generation memory and speed)'
                echo
                echo '```'
                echo 'command: python benchmarks/generate_memory.py --caches dynamic,kakeya:recommended,kakeya:uniform-ec'
                python benchmarks/generate_memory.py --caches dynamic,kakeya:recommended,kakeya:uniform-ec
                echo '```'
            } > reports/entropy/generate_memory_uniform_ec.md ;;
        scales)
            run entropy/eval_uniform_ec_log8 kakeya eval --config uniform-ec-log8 \
                --json reports/entropy/eval_uniform_ec_log8.json
            python reports/basis/calibration_text.py /tmp/wikitext2_calibration_part.txt
            run entropy/heldout16_uniform_ec_log8 kakeya eval --text-file /tmp/wikitext2_calibration_part.txt \
                --config uniform-ec-log8 --passages 16 --json reports/entropy/heldout16_uniform_ec_log8.json
            run entropy/probe_log8_v3_everywhere kakeya eval \
                --config reports/entropy/probe_log8_v3_everywhere.policy.json \
                --json reports/entropy/probe_log8_v3_everywhere.json
            run entropy/heldout16_log8_v3_everywhere kakeya eval --text-file /tmp/wikitext2_calibration_part.txt \
                --config reports/entropy/probe_log8_v3_everywhere.policy.json --passages 16 \
                --json reports/entropy/heldout16_log8_v3_everywhere.json
            run entropy/compare_engines_uniform_ec_log8 kakeya compare-engines --config uniform-ec-log8 \
                --passages 16 --ctx 1024 --n-eval 256 --json reports/entropy/compare_engines_uniform_ec_log8.json
            python reports/entropy/byte_breakdown.py uniform-ec uniform-ec-log8 recommended \
                > reports/entropy/byte_breakdown.md ;;
        tune)
            python reports/basis/calibration_text.py /tmp/wikitext2_calibration_part.txt
            # Steps 1-2 (the 50-minute search) are replayed from the committed record; drop
            # --reuse-search to measure them again (the same rounds come out: it is seeded).
            kakeya tune --text-file /tmp/wikitext2_calibration_part.txt --passages 8 --val-passages 8 \
                --ctx 1024 --n-eval 256 --budget-dppl 0.008 --ladder reports/entropy/ladder_log8.json \
                --sink-tokens 1 --compare uniform-ec-log8 --out reports/entropy/tune_log8 --name tuned-log8 \
                --no-progress --reuse-search reports/entropy/tune_log8/tune.json > /dev/null
            run entropy/eval_tuned_log8 kakeya eval --config reports/entropy/tune_log8/policy.json \
                --json reports/entropy/eval_tuned_log8.json
            run entropy/eval_tuned_log8_greedy_endpoint kakeya eval \
                --config reports/entropy/tune_log8/greedy_endpoint.policy.json \
                --json reports/entropy/eval_tuned_log8_greedy_endpoint.json
            # the second search (KL budget, KL cost), replayed the same way
            kakeya tune --text-file /tmp/wikitext2_calibration_part.txt --passages 8 --val-passages 8 \
                --ctx 1024 --n-eval 256 --budget-dppl 0.008 --budget-kl 0.0065 --cost kl \
                --ladder reports/entropy/ladder_log8.json --sink-tokens 1 --compare uniform-ec-log8 \
                --out reports/entropy/tune_log8_kl --name tuned-log8-kl --no-progress \
                --reuse-search reports/entropy/tune_log8_kl/tune.json > /dev/null
            run entropy/eval_tuned_log8_kl kakeya eval --config reports/entropy/tune_log8_kl/policy.json \
                --json reports/entropy/eval_tuned_log8_kl.json
            run entropy/eval_tuned_log8_kl_greedy_endpoint kakeya eval \
                --config reports/entropy/tune_log8_kl/greedy_endpoint.policy.json \
                --json reports/entropy/eval_tuned_log8_kl_greedy_endpoint.json
            run entropy/compare_engines_tuned_log8_kl_greedy_endpoint kakeya compare-engines \
                --config reports/entropy/tune_log8_kl/greedy_endpoint.policy.json --passages 16 --ctx 1024 \
                --n-eval 256 --json reports/entropy/compare_engines_tuned_log8_kl_greedy_endpoint.json ;;
        *)
            echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
