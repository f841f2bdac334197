#!/usr/bin/env bash
# The paper's experiments on the real 64x64 PBC split, in the order this project ran them (cheapest and most
# informative first). Every step is resumable: re-running the script skips finished runs and resumes an
# interrupted one, so it can be run in pieces across sessions. A step with several seeds runs one seed at a time,
# and a step may list several commands separated by ";". After each command the reports (not the weights) are
# copied to benchmarks/results/paper/, so a session that ends mid-step keeps the report of every finished run.
#
# Usage: bash benchmarks/paper_suites.sh [STEP...]     (default: all steps; e.g. "bash ... 1 2")
# Needs: .venv (make venv) and the prepared dataset:
#   bloodcell data prepare --source ../shared/data/pbc --split-file ../shared/data/pbc/split.csv --name pbc
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source .venv/bin/activate
B="bloodcell benchmark"
D="--data pbc --out runs/benchmarks"
steps=(
  ""                                                                      # 0 unused
  "$B paper-table2 $D --models cnn-t2-5"                                  # 1 the best Table 2 CNN first
  "$B paper-oversampling $D"                                              # 2 its oversampling study
  "$B paper-table2 $D"                                                    # 3 the other 12 ablations
  "$B paper-table3 $D --models se-cnn,cbam-cnn,sa-cnn,vgg,autoclassifier" # 4 the cheap Table 3 models
  "$B paper-table3 $D --models se-cnn,cbam-cnn --seeds 0,1,2"             # 5 three seeds, CNN attention
  "$B paper-table3 $D --models se-vgg15,cbam-vgg15,sa-vgg15"              # 6 VGG15 attention, seed 0
  "$B paper-table3 $D --models resnet34,resnet34-sound"                   # 7 ResNet34 at paper and sound settings
  "$B paper-table3 $D --models se-vgg15,cbam-vgg15 --seeds 0,1,2"         # 8 three seeds, VGG15 attention
  "$B paper-table3 $D --models cnn --epochs 10; $B paper-table3 $D --models inception --epochs 10"  # 9 measured: CNN 34 min/epoch, Inception 42: ~13 h
  "$B paper-table3 $D --models inception-sound --epochs 10 --precision bf16"  # 10 ~1.7 h under bf16 (below)
)
# Step 10 runs under bf16 autocast: on an Intel Xeon with AMX/AVX-512 BF16 that trains Inception 2.9x faster than
# fp32 (24.2 vs 8.3 images/s, benchmarks/results/bf16/model_throughput_amx.md), so the run fits in one 3-hour
# session (it took 1.9 h); in fp32 it needs about 6.5 h, and its part-run state did not survive between sessions.
# On a CPU without bf16 units drop --precision bf16 (bf16 is then emulated and several times slower).
# Steps 9-10 run 10 epochs, not the paper's 20: under the paper's compounding schedule the learning rates of
# epochs 11-20 add up to 0.15% of those of epochs 1-10 (lr <= 4.1e-6), so the last 10 epochs barely move the
# weights, while each costs 34 (CNN) to 42 (Inception) minutes on 2 CPU cores
# (history.csv of each run; runs.csv gives the mean once a run is finished). The report shows each entry's epoch count.
# A fresh clone has no runs/: put the committed finished runs back so they are skipped, not re-trained, and each
# suite report still covers every row. An interrupted run's checkpoint is not committed, so it starts again.
python benchmarks/sync_paper_results.py --restore
todo=("$@")
[ ${#todo[@]} -eq 0 ] && todo=($(seq 1 $((${#steps[@]} - 1))))
for k in "${todo[@]}"; do
  echo "== step $k: ${steps[$k]}  ($(date -u +%FT%TZ))"
  IFS=';' read -ra cmds <<< "${steps[$k]}"
  for cmd in "${cmds[@]}"; do
    seeds=$(grep -oP '(?<=--seeds )[0-9,]+' <<< "$cmd" || true)
    if [[ $seeds == *,* ]]; then                                         # several seeds: one at a time
      for seed in ${seeds//,/ }; do
        ${cmd/--seeds $seeds/--seeds $seed}
        python benchmarks/sync_paper_results.py
      done
    else
      $cmd
      python benchmarks/sync_paper_results.py
    fi
  done
done
