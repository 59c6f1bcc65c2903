#!/usr/bin/env bash
# Reproduce the shipped tiny model from scratch: data, VAE, teacher, LCM distillation.
# Stages are resumable: a finished stage is skipped, an interrupted one continues from its last
# checkpoint. Needs npm (for the emoji package) and about 15 CPU-hours on 2 cores.
#
#   scripts/reproduce_tiny.sh [WORK_DIR]       (default: ./tiny-work)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-tiny-work}
mkdir -p "$WORK"
cargo build --release
LCM=target/release/lcm
# One thread for matmuls too: at these sizes a teacher step took 0.92 s on one thread against
# 1.21 s on two beside another job (docs/benchmarks.md); two stages can then run side by side.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}

# Data: procedural shapes (train + held-out) and the Noto emoji with a held-out split.
[ -f "$WORK/data/shapes/metadata.jsonl" ] || $LCM data shapes --out "$WORK/data/shapes" --count 20000 --seed 0
# The distillation reads the first 8000 of them (the same seed gives the same images).
[ -f "$WORK/data/shapes8k/metadata.jsonl" ] || $LCM data shapes --out "$WORK/data/shapes8k" --count 8000 --seed 0
[ -f "$WORK/data/shapes-heldout/metadata.jsonl" ] || $LCM data shapes --out "$WORK/data/shapes-heldout" --count 1000 --seed 1
if [ ! -f "$WORK/data/emoji/train/metadata.jsonl" ]; then
    (cd "$WORK" && npm pack emoji-datasource-google@16.0.0 >/dev/null && mkdir -p emoji-pkg && tar xzf emoji-datasource-google-16.0.0.tgz -C emoji-pkg)
    $LCM data emoji --package "$WORK/emoji-pkg/package" --out "$WORK/data/emoji"
fi
EMOJI="$WORK/data/emoji/train"

resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume $1" || true; }

# Stage 1: the VAE (emoji weighted 3x against the 20k shapes), in the two parts that were run:
# 400 steps at lr 5e-4, then 900 more from its export at lr 1e-3 (fresh optimizer).
EMOJI3=("$EMOJI" "$EMOJI" "$EMOJI")
if [ ! -f "$WORK/vae/vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain vae --config configs/tiny/vae/config.json \
        --data "$WORK/data/shapes" "${EMOJI3[@]}" --output "$WORK/vae" \
        --max-steps 400 --batch-size 16 --lr 5e-4 --warmup-steps 50 --save-every 100 --sample-every 100 \
        --seed 0 $(resume_flag "$WORK/vae")
fi
if [ ! -f "$WORK/vae2/vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain vae --config configs/tiny/vae/config.json --init "$WORK/vae/vae" \
        --data "$WORK/data/shapes" "${EMOJI3[@]}" --output "$WORK/vae2" \
        --max-steps 900 --batch-size 16 --lr 1e-3 --warmup-steps 50 --save-every 150 --sample-every 150 \
        --seed 1 $(resume_flag "$WORK/vae2")
fi
# Part 3: the decoder alone (encoder frozen, so the latents every U-Net was trained on stay
# valid), L1 only, lr 5e-4 falling linearly to a tenth from step 400 to 1200.
if [ ! -f "$WORK/vae3/vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain vae --config configs/tiny/vae/config.json --init "$WORK/vae2/vae" --decoder-only \
        --data "$WORK/data/shapes" "${EMOJI3[@]}" --output "$WORK/vae3" \
        --max-steps 1200 --decay-from 400 --batch-size 16 --lr 5e-4 --warmup-steps 50 \
        --save-every 200 --sample-every 200 --seed 4 $(resume_flag "$WORK/vae3")
fi
# Part 4: the decoder alone again, from part 3, lr 3e-4 falling to a tenth from step 300 to 2000
# (run after the teacher's part 8, from part 3's f16 copy: its reconstructions drew small green
# shapes dark; the latents stay the same, so no U-Net is retrained).
if [ ! -f "$WORK/vae4/vae/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain vae --config configs/tiny/vae/config.json --init "$WORK/vae3/vae" --decoder-only \
        --data "$WORK/data/shapes" "${EMOJI3[@]}" --output "$WORK/vae4" \
        --max-steps 2000 --decay-from 300 --batch-size 16 --lr 3e-4 --warmup-steps 50 \
        --save-every 250 --sample-every 250 --seed 5 $(resume_flag "$WORK/vae4")
fi
# The U-Nets read the encoder's latents, the same in vae2, vae3 and vae4; the pipelines decode
# with vae4.
VAE="$WORK/vae2/vae"

# The evaluator behind `lcm eval` (real images only; independent of the model stages).
if [ ! -f "$WORK/evaluator/evaluator/config.json" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain evaluator --config configs/tiny/evaluator.json \
        --data "$WORK/data/shapes" "$EMOJI" \
        --heldout "$WORK/data/shapes-heldout" "$WORK/data/emoji/heldout" --output "$WORK/evaluator" \
        --max-steps 5000 --batch-size 64 --lr 2e-3 --warmup-steps 100 --save-every 500 \
        --seed 0 $(resume_flag "$WORK/evaluator")
fi

# Stage 2: the teacher (U-Net + text encoder) on the VAE's latents, in the parts that were run:
# 1000 steps on plain noise, then from that export with offset noise 0.2 (docs/training-log.md says
# why), then a third part with min-SNR weighting; each part starts from the previous one's export
# (--init, fresh optimizer), which is how the stage spanned sessions.
# (A "done" marker, not the export: samples every 500 steps export model/ before the part ends.)
if [ ! -f "$WORK/teacher/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny --vae "$VAE" \
        --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher" \
        --max-steps 1000 --batch-size 16 --lr 1e-3 --warmup-steps 200 --save-every 250 --sample-every 500 \
        --seed 0 $(resume_flag "$WORK/teacher") && touch "$WORK/teacher/done"
fi
if [ ! -f "$WORK/teacher2/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny --vae "$VAE" --init "$WORK/teacher/model" --noise-offset 0.2 \
        --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher2" \
        --max-steps 5000 --batch-size 16 --lr 1e-3 --warmup-steps 100 --save-every 250 \
        --sample-every 500 --seed 1 $(resume_flag "$WORK/teacher2") && touch "$WORK/teacher2/done"
fi
# Part 3: from part 2's export with min-SNR-5 weighting, constant lr to 2000, then falling linearly
# to a tenth at 4000 (docs/training-log.md: it learned shapes faster than the unweighted continuation).
if [ ! -f "$WORK/teacher3/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny --vae "$VAE" --init "$WORK/teacher2/model" --noise-offset 0.2 \
        --snr-gamma 5 --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher3" \
        --max-steps 4000 --decay-from 2000 --batch-size 16 --lr 1e-3 --warmup-steps 100 --save-every 250 \
        --sample-every 500 --seed 2 $(resume_flag "$WORK/teacher3") && touch "$WORK/teacher3/done"
fi
# Part 4: from part 3's export, the same weighting, lr 5e-4 falling linearly to a tenth over 4000
# steps (docs/training-log.md: chosen over the same run at lr 1e-3). The shipped run started from the
# f16 copy of part 3 in weights/ and encoded with the f16 VAE; this uses the f32 exports.
if [ ! -f "$WORK/teacher4/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny --vae "$VAE" --init "$WORK/teacher3/model" --noise-offset 0.2 \
        --snr-gamma 5 --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher4" \
        --max-steps 4000 --decay-from 100 --batch-size 16 --lr 5e-4 --warmup-steps 100 --save-every 250 \
        --sample-every 500 --seed 3 $(resume_flag "$WORK/teacher4") && touch "$WORK/teacher4/done"
fi
# Part 5: grown from part 4 (`--grow`) into configs/tiny-xattn, which adds cross-attention at the
# full 16² latent resolution (the first down block and the last up block), new attention outputs
# zeroed so it starts as part 4; then the same weighting, lr 5e-4 falling linearly to a tenth at
# step 4000. (The third shipped model used this run's step-3000 export; part 6 starts from 4000.)
if [ ! -f "$WORK/teacher5/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny-xattn --vae "$VAE" --init "$WORK/teacher4/model" --grow \
        --noise-offset 0.2 --snr-gamma 5 --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher5" \
        --max-steps 4000 --decay-from 100 --batch-size 16 --lr 5e-4 --warmup-steps 100 \
        --save-every 250 --sample-every 500 --seed 5 $(resume_flag "$WORK/teacher5") && touch "$WORK/teacher5/done"
fi
# The text encoder retrained as CLIP's text tower: contrastively against a small image tower over
# the VAE's latents (docs/training-log.md: a twin with --hard-negatives 0.5 made a worse teacher).
if [ ! -f "$WORK/text/done" ]; then
    # shellcheck disable=SC2046
    $LCM pretrain text --config configs/tiny-xattn --vae "$VAE" \
        --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/text" \
        --max-steps 1500 --decay-from 500 --batch-size 128 --lr 1e-3 --warmup-steps 100 --save-every 250 \
        --seed 0 $(resume_flag "$WORK/text") && touch "$WORK/text/done"
fi
# Parts 6 to 8 condition the U-Net on that text encoder, frozen (--text-encoder), and differ only
# in where they start, their length, lr, seed and lr decay: PART INIT MAX_STEPS LR SEED DECAY_FROM
# [MORE FLAGS].
on_text_encoder() {
    [ -f "$WORK/teacher$1/done" ] && return
    # shellcheck disable=SC2046
    $LCM pretrain unet --config configs/tiny-xattn --vae "$VAE" --init "$2" "${@:7}" \
        --text-encoder "$WORK/text/text_encoder" --noise-offset 0.2 --snr-gamma 5 \
        --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --output "$WORK/teacher$1" \
        --max-steps "$3" --decay-from "$6" --batch-size 16 --lr "$4" --warmup-steps 100 \
        --save-every 250 --sample-every 500 --seed "$5" $(resume_flag "$WORK/teacher$1") && touch "$WORK/teacher$1/done"
}
# Part 6: part 5's U-Net; the cross-attention relearns to read the new encoder. lr 5e-4 falling
# linearly to a tenth from step 500 towards 3000 (interrupted at step 1000 and resumed, bit-exact).
on_text_encoder 6 "$WORK/teacher5/model" 3000 5e-4 6 500
# Part 7: part 6 continued, lr 3e-4 falling from step 500 over 4000 steps (interrupted at step
# 1549 and resumed from 1500, bit-exact).
on_text_encoder 7 "$WORK/teacher6/model" 4000 3e-4 7 500
# Part 8: part 7 continued 1500 steps with an EMA of the weights (what it exports), lr 2e-4 falling
# from step 300 (the shipped run started from part 7's f16 copy and encoded with the f16 VAE).
on_text_encoder 8 "$WORK/teacher7/model" 1500 2e-4 8 300 --ema 0.999

# Whitened latents (docs/training-log.md: the VAE put green and purple 0.93 apart where other pairs
# are 3-5 apart, so those shapes drowned in the noise first): the decoder-tuned VAE whitened with
# a ridge of 0.01, and part 8's U-Net rewired to it as the next part's start. (The shipped run
# whitened the f16 copies in weights/ of vae4 and part 8.)
WHITE="$WORK/whiten"
if [ ! -f "$WHITE/teacher/model_index.json" ]; then
    $LCM whiten --vae "$WORK/vae4/vae" --data "$WORK/data/shapes" "$EMOJI" "$EMOJI" --samples 2048 \
        --ridge 0.01 --output "$WHITE/vae" --unet "$WORK/teacher8/model/unet" --unet-output "$WHITE/unet"
    rm -rf "$WHITE/teacher" && cp -r "$WORK/teacher8/model" "$WHITE/teacher"
    rm -rf "$WHITE/teacher/unet" "$WHITE/teacher/vae"
    cp -r "$WHITE/unet" "$WHITE/teacher/unet" && cp -r "$WHITE/vae" "$WHITE/teacher/vae"
fi
VAE="$WHITE/vae"
# Part 10: 2000 steps on the whitened latents (posterior samples), lr 3e-4 falling from step 500.
on_text_encoder 10 "$WHITE/teacher" 2000 3e-4 11 500 --ema 0.999
# Part 11: on the posterior's means (samples filled the weakest directions with the posterior's
# own noise, drawn as coloured blotches): a 4000-step schedule at lr 2e-4 falling from step 2000,
# stopped at step 500 to distil from it within the session.
on_text_encoder 11 "$WORK/teacher10/model" 4000 2e-4 12 2000 --ema 0.999 --posterior-mean --stop-at 500
TEACHER="$WORK/teacher11/model"

# Stage 3: the LCM, distilled with the pseudo-Huber loss on the first 8000 shapes and the emoji twice.
if [ ! -f "$WORK/lcm/model_index.json" ]; then
    # shellcheck disable=SC2046
    $LCM distill --teacher "$TEACHER" --noise-offset 0.2 --data "$WORK/data/shapes8k" "$EMOJI" "$EMOJI" \
        --output "$WORK/lcm" --max-steps 1500 --batch-size 16 --lr 2e-4 --warmup-steps 100 --decay-from 400 \
        --w-embed-dim 64 --w-min 2 --w-max 8 --loss huber --posterior-mean --save-every 250 --sample-every 500 \
        --seed 0 $(resume_flag "$WORK/lcm")
fi

# Not shipped (issue 30's comparison): the flow-map twin of the LCM, its exact flags with the
# flow-map objective; `lcm eval --model "$WORK/flow" --sampler flowmap --steps N` gives its rows.
if [ ! -f "$WORK/flow/model_index.json" ]; then
    # shellcheck disable=SC2046
    $LCM distill --teacher "$TEACHER" --noise-offset 0.2 --data "$WORK/data/shapes8k" "$EMOJI" "$EMOJI" \
        --output "$WORK/flow" --max-steps 1500 --batch-size 16 --lr 2e-4 --warmup-steps 100 --decay-from 400 \
        --w-embed-dim 64 --w-min 2 --w-max 8 --loss huber --posterior-mean --save-every 250 --sample-every 500 \
        --seed 0 --objective flow-map $(resume_flag "$WORK/flow")
fi

# Ship: f16 copies in the layout of weights/: the pipelines share one VAE (the decoder-tuned one,
# whitened) and the LCM reads its teacher's text encoder and tokenizer through links.
SHIP="$WORK/ship"
rm -rf "$SHIP" && mkdir -p "$SHIP"
$LCM convert --input "$WHITE/vae" --output "$SHIP/tiny-vae" --dtype f16
$LCM convert --input "$TEACHER" --output "$SHIP/tiny-teacher" --dtype f16
rm -rf "$SHIP/tiny-teacher/vae" && ln -s ../tiny-vae "$SHIP/tiny-teacher/vae"
$LCM convert --input "$WORK/lcm" --output "$SHIP/tiny" --dtype f16
for c in text_encoder tokenizer vae; do
    rm -rf "${SHIP:?}/tiny/$c" && ln -s "../tiny-teacher/$c" "$SHIP/tiny/$c"
done
echo "done: $SHIP/{tiny,tiny-teacher,tiny-vae}; copy them to weights/ and run scripts/quality_table.sh"
