#!/usr/bin/env bash
# The quality table of the shipped model: `lcm eval` for the teacher (DDIM 50 and 4 steps, guidance
# 7.5), the LCM (1/2/4/8 steps) and TCD (4 steps), same prompts and seeds for every row.
#
#   scripts/quality_table.sh [SAMPLES] [OUT_DIR]      (defaults: 200, eval-results)
# Prints the markdown table and leaves one JSON + markdown file per row in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-200}
OUT=${2:-eval-results}
mkdir -p "$OUT"
cargo build --release
LCM=target/release/lcm

row() { # name, then lcm eval flags
    local name=$1
    shift
    $LCM eval --samples "$SAMPLES" --output "$OUT/$name.json" "$@" >/dev/null
}
row teacher-ddim50 --model tiny-teacher --sampler ddim --steps 50 --guidance 7.5
row teacher-ddim4 --model tiny-teacher --sampler ddim --steps 4 --guidance 7.5
for n in 1 2 4 8; do
    row "lcm-$n" --model tiny --sampler lcm --steps "$n"
done
row tcd-4 --model tiny --sampler tcd --steps 4

# One table: the header of the first file, then every file's data row.
head -n 2 "$OUT/teacher-ddim50.md"
for f in teacher-ddim50 teacher-ddim4 lcm-1 lcm-2 lcm-4 lcm-8 tcd-4; do
    sed -n 3p "$OUT/$f.md"
done
echo
echo "$SAMPLES images per row (held-out prompts, seeds 0..$((SAMPLES - 1))); evaluator weights/tiny-eval"
