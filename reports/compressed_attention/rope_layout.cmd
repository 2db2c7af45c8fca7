python benchmarks/rope_layout_quality.py --passages 4 --ctx 1024 --n-eval 128 --json
