#!/usr/bin/env bash
# The motion model card's pictures (weights/tiny-motion/README.md), from the shipped weights:
#   docs/img/tiny-motion-vae.gif      two held-out test clips and one real capture (top row)
#                                     and their motion-VAE reconstructions (bottom row)
#   docs/img/tiny-motion-samples.gif  `lcm generate --model tiny-motion` at its defaults, seed 0,
#                                     for six prompts (the first three phrased as the training
#                                     captions are, the last three not), left to right
#
#   scripts/motion_card.sh DATA        (DATA: the `lcm data motion` folder)
#   LCM=/path/to/lcm scripts/motion_card.sh DATA     (use that binary, build nothing)
set -euo pipefail
if [ -n "${LCM:-}" ]; then LCM=$(realpath "$LCM"); fi
DATA=$(realpath "$1")
cd "$(dirname "$0")/.."
if [ -z "${LCM:-}" ]; then
    cargo build --release
    LCM=target/release/lcm
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

originals=() recs=()
for name in P000002 P000021 R_cartwheel; do
    $LCM motion convert "$DATA/new_joint_vecs/$name.npy" --output "$TMP/$name.json" >/dev/null
    $LCM motion reconstruct "$DATA/new_joint_vecs/$name.npy" --vae weights/tiny-motion/motion_vae \
        --output "$TMP/$name-rec.json"
    originals+=("$TMP/$name.json") recs+=("$TMP/$name-rec.json")
done
$LCM motion render "${originals[@]}" "${recs[@]}" --cols 3 --every 2 --output docs/img/tiny-motion-vae.gif

prompts=(
    "a person walks forward and waves with the left hand"
    "someone runs forward quickly while turning to the right"
    "a person kicks with the right leg twice"
    "somebody strolls ahead and then greets with the right hand"
    "the figure hops three times on the spot"
    "a man jogs backwards"
)
clips=()
for i in "${!prompts[@]}"; do
    $LCM generate --model tiny-motion --prompt "${prompts[$i]}" --seed 0 --output "$TMP/p$i.json" | grep time:
    clips+=("$TMP/p$i.json")
done
$LCM motion render "${clips[@]}" --cols 3 --every 2 --output docs/img/tiny-motion-samples.gif
ls -la docs/img/tiny-motion-*.gif
