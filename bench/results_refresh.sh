#!/usr/bin/env bash
# The README's "Class-balanced accuracy, per class, colours" table: one evaluate.py run per row on the showcase
# checkpoint (python train.py timesteps=500 trainer.max_epochs=60 "callbacks=[default,sample_quality]"
# hydra.run.dir=logs/results/showcase; the 2026-12-03 rows used its epoch-30 checkpoint, copied to CKPT).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-logs/results/showcase30/last.ckpt}
export OMP_WAIT_POLICY=PASSIVE  # a shared machine: no OpenMP spin-waiting
run() { name=$1; shift; python evaluate.py ckpt="$CKPT" n=1000 hydra.run.dir="logs/eval/refresh/$name" "$@"; }
run ddim25 sampler=ddim steps=25
run ddim25_w3 sampler=ddim steps=25 guidance=3
run ddim25_eta1 sampler=ddim steps=25 sampler.eta=1.0 reference=false
run heun18 sampler=heun steps=18 reference=false
run ddim25_w3_interval sampler=ddim steps=25 guidance=3 "guidance_interval=[0.3,5]" reference=false
run ddim25_w3_palette sampler=ddim steps=25 guidance=3 palette=sprite palette_colors=16 reference=false
