#!/usr/bin/env bash
# The sample picture of the model card (docs/img/tiny-samples.png): the default model at its
# defaults (`lcm generate --prompt P --seed S`, no other flag) for the 12 prompts below, seeds 0, 1
# and 2 side by side, prompts numbered 1–12 in two columns. Needs ImageMagick's convert.
#
#   LCM=/path/to/lcm scripts/sample_grid.sh [OUT.png]     (default: docs/img/tiny-samples.png)
# LCM: an lcm binary to use; when unset, `cargo build --release` and target/release/lcm.
set -euo pipefail
if [ -n "${LCM:-}" ]; then
    LCM=$(realpath "$LCM")
fi
cd "$(dirname "$0")/.."
OUT=${1:-docs/img/tiny-samples.png}
if [ -z "${LCM:-}" ]; then
    cargo build --release
    LCM=target/release/lcm
fi
PROMPTS=(
    # phrased as the training captions
    "a large red circle in the center on a white background"
    "a small green triangle at the top left on a purple background"
    "blue background, white cross, large, bottom-right"
    "a yellow star on black"
    "large orange ring on the left, blue backdrop"
    "a large blue square at the bottom on a yellow background"
    "an emoji of grinning face"
    # phrased unlike them: other word order, synonyms, an unknown shape, no background
    "on a black background, a large yellow star at the top right"
    "a big crimson disc on a white background"
    "a blue box on a yellow background"
    "a red heart on a white background"
    "a purple triangle"
)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cells=()
for i in "${!PROMPTS[@]}"; do
    n=$((i + 1))
    for s in 0 1 2; do
        "$LCM" generate --prompt "${PROMPTS[$i]}" --seed "$s" --output "$TMP/p${n}_s$s.png" >/dev/null 2>&1
    done
    convert "$TMP/p${n}_s0.png" "$TMP/p${n}_s1.png" "$TMP/p${n}_s2.png" -filter point -resize 200% \
        +append -bordercolor white -border 3 "$TMP/row$n.png"
    convert -size 30x134 xc:white -font DejaVu-Sans-Bold -pointsize 16 -gravity center \
        -annotate 0 "$n" "$TMP/row$n.png" +append "$TMP/cell$n.png"
    cells+=("$TMP/cell$n.png")
done
pairs=()
for ((i = 0; i < ${#cells[@]}; i += 2)); do
    convert "${cells[$i]}" "${cells[$((i + 1))]}" +append "$TMP/pair$i.png"
    pairs+=("$TMP/pair$i.png")
done
mkdir -p "$(dirname "$OUT")"
convert "${pairs[@]}" -append -strip +dither -colors 96 -define png:compression-level=9 "PNG8:$OUT"
echo "wrote $OUT"
