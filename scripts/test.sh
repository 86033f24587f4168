#!/usr/bin/env bash
# The whole test suite: the Rust crate (`cargo test`), then the Python package (pytest, via
# scripts/test-python.sh). Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test "$@"
./scripts/test-python.sh
