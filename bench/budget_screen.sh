#!/usr/bin/env bash
# The README's screening table (Results, "At a 20-minute budget"): recipes trained two at a time, one thread each
# (OMP_NUM_THREADS=1), 20 minutes of wall time each (experiment=sprites_20min), then scored by evaluate.py with
# n=1000, DDIM-25, guidance 0 and 2, raw samples. Pairs share the machine alike, so a pair compares at equal wall time; a run
# gets about 70% of the steps it would get alone on both cores. Every run spells out the settings that changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OLD="objective=eps data.balanced=false model.scale_shift=false model.dropout=0.1"  # the recipe before issue 12
job() {
  name=$1; shift
  python train.py experiment=sprites_20min "$@" hydra.run.dir="logs/screen/$name"
  python evaluate.py -m ckpt="logs/screen/$name" n=1000 sampler=ddim guidance=0,2 palette=null hydra.sweep.dir="logs/screen_eval/$name"
}
pair() { job "$1" $2 & job "$3" $4 & wait; }
pair base "$OLD" bal "$OLD data.balanced=true"
pair bal_ss "$OLD data.balanced=true model.scale_shift=true" bal_do0 "$OLD data.balanced=true model.dropout=0"
pair c_vmsnr "$OLD data.balanced=true model.scale_shift=true model.dropout=0 objective=v_min_snr" \
     c_edm "$OLD data.balanced=true model.scale_shift=true model.dropout=0 objective=edm"
