#!/usr/bin/env bash
# The whole test suite: Rust format, lints and tests; Python lint and tests (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
python3 -m ruff check python tests benchmarks calibration reports scripts
python3 -m pytest -q -ra "$@"
