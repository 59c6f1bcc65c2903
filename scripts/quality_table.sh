#!/usr/bin/env bash
# The quality table of the shipped model (weights/README.md): `lcm eval` for the teacher (DDIM 50
# and 4 steps, guidance 7.5), the LCM (1/2/4/8 steps) and TCD (4 steps), same prompts and seeds for
# every row. Every column is read from the JSON files `lcm eval` writes (jq), none by hand.
#
#   scripts/quality_table.sh [SAMPLES] [OUT_DIR]      (defaults: 200, eval-results)
#   SAMPLES=8 OUT=/tmp/qt LCM=/path/to/lcm scripts/quality_table.sh
#
# LCM: an lcm binary to use; when set, nothing is built (otherwise `cargo build --release`).
# Prints the markdown table and leaves one JSON (+ markdown) file per row in OUT_DIR.
set -euo pipefail
if [ -n "${LCM:-}" ]; then
    LCM=$(realpath "$LCM")
fi
cd "$(dirname "$0")/.."
SAMPLES=${1:-${SAMPLES:-200}}
OUT=${2:-${OUT:-eval-results}}
command -v jq >/dev/null || { echo "quality_table.sh needs jq" >&2; exit 1; }
mkdir -p "$OUT"
if [ -z "${LCM:-}" ]; then
    cargo build --release
    LCM=target/release/lcm
fi

ROWS=(teacher-ddim50 teacher-ddim4 lcm-1 lcm-2 lcm-4 lcm-8 tcd-4)
row() { # name, then lcm eval flags
    local name=$1
    shift
    "$LCM" eval --samples "$SAMPLES" --output "$OUT/$name.json" "$@" >/dev/null
}
row teacher-ddim50 --model tiny-teacher --sampler ddim --steps 50 --guidance 7.5
row teacher-ddim4 --model tiny-teacher --sampler ddim --steps 4 --guidance 7.5
for n in 1 2 4 8; do
    row "lcm-$n" --model tiny --sampler lcm --steps "$n"
done
row tcd-4 --model tiny --sampler tcd --steps 4

# One row per JSON file; a missing field stops the script rather than leaving a blank cell.
FIELDS='[.model, .sampler, .steps, .guidance, .fid, .prompt_accuracy,
         .attribute_accuracy.shape, .attribute_accuracy.color, .attribute_accuracy.position,
         .agreement, .ms_per_image]'
echo "| model | sampler | steps | guidance | FID ↓ | prompt accuracy ↑ | shape | colour | position | agreement ↑ | ms/image |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for f in "${ROWS[@]}"; do
    jq -r "$FIELDS | if any(. == null) then error(\"$OUT/$f.json lacks a field\") else @tsv end" "$OUT/$f.json" |
        while IFS=$'\t' read -r model sampler steps guidance fid acc shape color position agree ms; do
            LC_ALL=C printf '| %s | %s | %s | %s | %.1f | %.1f %% | %.0f %% | %.0f %% | %.0f %% | %.3f | %.0f |\n' \
                "$model" "$sampler" "$steps" "$guidance" "$fid" "$(jq -n "$acc * 100")" \
                "$(jq -n "$shape * 100")" "$(jq -n "$color * 100")" "$(jq -n "$position * 100")" \
                "$agree" "$ms"
        done
done
echo
echo "$SAMPLES images per row (held-out prompts, seeds 0..$((SAMPLES - 1))); evaluator weights/tiny-eval"
