#!/usr/bin/env bash
# The image-to-image picture of the model card (docs/img/tiny-img2img.png): three rough sketches
# drawn here (left column) through the default model with `lcm generate --init-image SKETCH
# --prompt P --strength S --seed 0` at strengths 0.3, 0.5 and 0.7 (left to right), 2× enlarged.
# Needs ImageMagick's convert.
#
#   LCM=/path/to/lcm scripts/img2img_grid.sh [OUT.png]     (default: docs/img/tiny-img2img.png)
set -euo pipefail
if [ -n "${LCM:-}" ]; then
    LCM=$(realpath "$LCM")
fi
cd "$(dirname "$0")/.."
OUT=${1:-docs/img/tiny-img2img.png}
if [ -z "${LCM:-}" ]; then
    cargo build --release
    LCM=target/release/lcm
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Sketches: flat colours, wobbly outlines, as a person would draw them.
convert -size 64x64 xc:'#f4f4f4' -fill '#d22' -stroke '#a11' -strokewidth 2 \
    -draw "ellipse 30,34 17,15 0,360" "$TMP/sketch0.png"
convert -size 64x64 xc:'#2a3fbf' -fill '#f2e21a' -stroke none \
    -draw "polygon 32,8 38,26 57,26 42,37 48,56 32,44 16,56 22,37 7,26 26,26" "$TMP/sketch1.png"
convert -size 64x64 xc:'#ffe23a' -fill '#1f3fd0' -stroke '#0a1a80' -strokewidth 2 \
    -draw "polygon 12,14 52,12 50,52 14,50" "$TMP/sketch2.png"
PROMPTS=(
    "a large red circle in the center on a white background"
    "a large yellow star in the center on a blue background"
    "a large blue square in the center on a yellow background"
)
rows=()
for i in 0 1 2; do
    cells=("$TMP/sketch$i.png")
    for s in 0.3 0.5 0.7; do
        "$LCM" generate --init-image "$TMP/sketch$i.png" --prompt "${PROMPTS[$i]}" --strength "$s" \
            --seed 0 --output "$TMP/r${i}_$s.png" >/dev/null
        cells+=("$TMP/r${i}_$s.png")
    done
    convert "${cells[@]}" -filter point -resize 200% -bordercolor white -border 3 +append "$TMP/row$i.png"
    rows+=("$TMP/row$i.png")
done
mkdir -p "$(dirname "$OUT")"
convert "${rows[@]}" -append -strip +dither -colors 96 -define png:compression-level=9 "PNG8:$OUT"
echo "wrote $OUT"
