#!/usr/bin/env bash
# Part 1 on a real network: a float ResNet-20 trained on the JPEG images with the fast recipe, then
# every pruning method of `microsearch sweep` over a range of ratios; the methods that retrain get
# the same fine-tuning budget (Han et al. spreads it over its steps). Resumable: run it again and
# finished steps are skipped (the training resumes from its per-epoch checkpoint). The trained model
# is kept beside the results (OUT/resnet20/model.pt, 1.1 MB): the sweeps and the session study's
# distillation teacher (studies/cifar10-jpeg-cpu-session.toml) read it there.
#   bash benchmarks/part1_jpeg.sh [OUT] [EPOCHS] [FINETUNE_EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/2026-11-25-part1-jpeg}
EPOCHS=${2:-30}
FT=${3:-3}
DATA=imagefolder:~/data/cifar10-jpeg
MODEL=$OUT/resnet20
ms() { echo "+ microsearch $*" >&2; .venv/bin/microsearch "$@"; }

if [ ! -f $MODEL/model.pt ]; then
  ms train --data $DATA --model resnet20 --epochs $EPOCHS --recipe fast --out runs/part1-jpeg/resnet20 --json \
    > runs/part1-jpeg/train.json
  mkdir -p $MODEL && cp runs/part1-jpeg/resnet20/model.pt runs/part1-jpeg/train.json $MODEL/
fi
sweep() {  # METHOD RATIOS [options]: skipped when OUT/sweep.json holds the method already
  grep -q "\"method\": \"$1\"" "$OUT/sweep.json" 2>/dev/null && return 0
  ms sweep $MODEL/model.pt --data $DATA --out "$OUT" --method "$1" --ratios "$2" "${@:3}"
}
sweep random 0.3,0.5,0.7,0.8,0.9
sweep global 0.3,0.5,0.7,0.8,0.9
sweep han 0.5,0.7,0.8,0.9 --finetune-epochs $FT
sweep li 0.2,0.4,0.6 --finetune-epochs $FT
sweep thinet 0.2,0.4,0.6 --finetune-epochs $FT
# The figure as a PNG for readers without a browser (the cheap random sweep again, same rows).
[ -f "$OUT/sweep.png" ] || ms sweep $MODEL/model.pt --data $DATA --out "$OUT" --method random --ratios 0.3,0.5,0.7,0.8,0.9 --png
