#!/usr/bin/env bash
# A longer run of the property-based fuzz tests (tests/fuzz.rs): CASES per property (CI runs
# proptest's default 256). A failure prints the minimal failing input.
#   scripts/fuzz.sh [CASES]     # default 100000
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES="${1:-100000}" cargo test --release --locked --test fuzz -- --nocapture
