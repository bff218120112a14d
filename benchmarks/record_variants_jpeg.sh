#!/usr/bin/env bash
# Side-by-side on the JPEG images, equal epochs, fast recipe, one seed: a 4/4-bit ResNet-20 (stem
# and classifier 8-bit) from scratch, distilled from the Part 1 float ResNet-20, and distilled and
# started from its weights (--init, as [distill] init does in a search); then, distilled and
# started from the teacher, the cheaper variants at their scores: 2/2 bits (2-bit activations cut
# the ops term only with 2-bit weights: it takes the larger), the stride-2 stem, and both.
# Resumable: finished runs (OUT/NAME.json) are skipped, an interrupted one resumes from its checkpoint.
#   bash benchmarks/record_variants_jpeg.sh [OUT] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/2026-11-26-record-variants-jpeg}
EPOCHS=${2:-4}
DATA=imagefolder:~/data/cifar10-jpeg
TEACHER=benchmarks/results/2026-11-25-part1-jpeg/resnet20/model.pt  # float ResNet-20, 87.42% validation
mkdir -p "$OUT"
run() {  # NAME [train options]
  [ -f "$OUT/$1.json" ] && return 0
  echo "+ microsearch train ... --out runs/record-variants/$1 ${*:2}" >&2
  .venv/bin/microsearch train --data $DATA --model resnet20 --epochs $EPOCHS --recipe fast \
    --first-last-bits 8 --out runs/record-variants/$1 --json "${@:2}" > "$OUT/$1.json.tmp"
  mv "$OUT/$1.json.tmp" "$OUT/$1.json"
}
run w4a4 --weight-bits 4 --act-bits 4
run w4a4-distill --weight-bits 4 --act-bits 4 --teacher $TEACHER
run w4a4-distill-init --weight-bits 4 --act-bits 4 --teacher $TEACHER --init $TEACHER --lr 0.05
run w2a2-distill-init --weight-bits 2 --act-bits 2 --teacher $TEACHER --init $TEACHER --lr 0.05
run w4a4-stride2-distill-init --weight-bits 4 --act-bits 4 --model-arg stem=stride2 --teacher $TEACHER --init $TEACHER --lr 0.05
run w2a2-stride2-distill-init --weight-bits 2 --act-bits 2 --model-arg stem=stride2 --teacher $TEACHER --init $TEACHER --lr 0.05
