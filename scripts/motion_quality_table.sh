#!/usr/bin/env bash
# The motion models' quality table (docs/motion.md, the model card): `lcm eval` on the test,
# compositional and paraphrase splits for ground truth and nearest-neighbour retrieval, the
# teacher (DDIM 50, CFG 7.5) and the student (LCM 1, 2 and 4 steps, guidance 7.5), same seeds for
# every row. Every number comes from the JSON and markdown files `lcm eval` writes.
#
#   scripts/motion_quality_table.sh DATA EVALUATOR TEACHER STUDENT [OUT_DIR]
#   LCM=/path/to/lcm scripts/motion_quality_table.sh ...     (use that binary, build nothing)
#   FLOW=DIR scripts/motion_quality_table.sh ...   (also a flow-map student at 1, 2, 4, 8 and 16
#                                                   steps, and the LCM at 8 and 16 beside it)
set -euo pipefail
if [ -n "${LCM:-}" ]; then LCM=$(realpath "$LCM"); fi
DATA=$(realpath "$1"); EVALUATOR=$(realpath "$2"); TEACHER=$3; STUDENT=$4; OUT=${5:-motion-eval}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -z "${LCM:-}" ]; then
    cargo build --release
    LCM=target/release/lcm
fi
row() { # name, model, then lcm eval flags; a row whose JSON exists is kept (delete it to redo)
    local name=$1 model=$2
    shift 2
    if [ -f "$OUT/$name.json" ]; then return; fi
    "$LCM" eval --model "$model" --data "$DATA" --evaluator "$EVALUATOR" --samples 300 \
        --output "$OUT/$name.json" "$@" >/dev/null
}
row teacher-ddim50 "$TEACHER" --sampler ddim --steps 50 --guidance 7.5 --baselines
LCM_STEPS="1 2 4"
if [ -n "${FLOW:-}" ]; then LCM_STEPS="1 2 4 8 16"; fi
rows=(teacher-ddim50)
for n in $LCM_STEPS; do
    row "student-$n" "$STUDENT" --sampler lcm --steps "$n" --guidance 7.5 --multimodality 20,10
    rows+=("student-$n")
done
if [ -n "${FLOW:-}" ]; then
    for n in 1 2 4 8 16; do
        row "flow-$n" "$FLOW" --sampler flowmap --steps "$n" --guidance 7.5 --multimodality 20,10
        rows+=("flow-$n")
    done
fi
# One table: the header once, then every row of every file.
head -2 "$OUT/teacher-ddim50.md"
for f in "${rows[@]}"; do
    label=$(echo "$f" | sed 's/student-\([0-9]*\)/student, LCM \1 step(s)/; s/flow-\([0-9]*\)/flow map, \1 step(s)/')
    tail -n +3 "$OUT/$f.md" | sed "s#| $STUDENT |#| $label |#; s#| $TEACHER |#| teacher, DDIM 50 |#; s#| ${FLOW:-/nonexistent} |#| $label |#"
done | sort -s -t'|' -k2,2
