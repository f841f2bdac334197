#!/usr/bin/env bash
# The main job: prepare the 64x64 data, train SE-CNN with the recommended settings, evaluate, report.
# Uses ../shared/data/pbc (with its split.csv) when present, else the official BloodMNIST download.
set -euo pipefail
PBC="${PBC:-../shared/data/pbc}"
EPOCHS="${DEMO_EPOCHS:-12}"
RUN="${DEMO_RUN:-runs/demo-se-cnn}"
start=$(date +%s)

if [ -d "$PBC" ]; then
  bloodcell data prepare --source "$PBC" --split-file "$PBC/split.csv" --size 64 --name pbc
  DATA=pbc
else
  echo "no $PBC: using the official BloodMNIST (needs internet, or see 'bloodcell data prepare --npz')"
  bloodcell data prepare --download --size 64
  DATA=bloodmnist
fi
bloodcell data info --data "$DATA" --size 64

resume=()
[ -f "$RUN/config.json" ] && resume=(--resume)
# the recommended recipe is train's default (Adam, cosine schedule, dihedral augmentation)
bloodcell train --model se-cnn --data "$DATA" --size 64 --epochs "$EPOCHS" --seed 0 --out "$RUN" "${resume[@]}"
bloodcell evaluate "$RUN" --split test --speed
# and with test-time augmentation over the 8 dihedral views, part of the recommended recipe (docs/training.md)
bloodcell evaluate "$RUN" --split test --tta dihedral

echo
echo "demo finished in $(( $(date +%s) - start ))s"
echo "report: $RUN/metrics.json (metrics: test, test_tta_dihedral), $RUN/confusion_test.png, $RUN/history.png, $RUN/history.csv"
echo "try:    bloodcell predict $RUN $PBC/basophil --top-k 3"
