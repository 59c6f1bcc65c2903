#!/usr/bin/env bash
# Reproduce the shipped tiny model from scratch: data, VAE, teacher, LCM distillation.
# Stages are resumable: a finished stage is skipped, an interrupted one continues from its last
# checkpoint. Needs npm (for the emoji package) and about 5 CPU-hours on 2 cores.
#
#   scripts/reproduce_tiny.sh [WORK_DIR]       (default: ./tiny-work)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-tiny-work}
mkdir -p "$WORK"
cargo build --release
LCM=target/release/lcm

# Data: procedural shapes (train + held-out) and the Noto emoji with a held-out split.
[ -f "$WORK/data/shapes/metadata.jsonl" ] || $LCM data shapes --out "$WORK/data/shapes" --count 20000 --seed 0
[ -f "$WORK/data/shapes-heldout/metadata.jsonl" ] || $LCM data shapes --out "$WORK/data/shapes-heldout" --count 1000 --seed 1
if [ ! -f "$WORK/data/emoji/train/metadata.jsonl" ]; then
    (cd "$WORK" && npm pack emoji-datasource-google@16.0.0 >/dev/null && mkdir -p emoji-pkg && tar xzf emoji-datasource-google-16.0.0.tgz -C emoji-pkg)
    $LCM data emoji --package "$WORK/emoji-pkg/package" --out "$WORK/data/emoji"
fi
EMOJI="$WORK/data/emoji/train"

resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume $1" || true; }

# Stage 1: the VAE (emoji weighted 3x against the 20k shapes).
if [ ! -f "$WORK/vae/vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain vae --config configs/tiny/vae/config.json \
        --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" "$EMOJI" --output "$WORK/vae" \
        --max-steps 700 --batch-size 16 --lr 5e-4 --warmup-steps 50 --save-every 100 --sample-every 100 \
        --seed 0 $(resume_flag "$WORK/vae")
fi

# Stage 2: the teacher (U-Net + text encoder) on the VAE's latents. (Provisional settings: this
# stage has not been run to completion yet; weights/README.md records what was actually run.)
if [ ! -f "$WORK/teacher/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny --vae "$WORK/vae/vae" \
        --data "$WORK/data/shapes" "$EMOJI" --output "$WORK/teacher" \
        --max-steps 6000 --batch-size 16 --lr 3e-4 --save-every 500 --sample-every 500 \
        --seed 0 $(resume_flag "$WORK/teacher") && touch "$WORK/teacher/done"
fi

echo "stages done; next: lcm distill --teacher $WORK/teacher/model (see weights/README.md)"
