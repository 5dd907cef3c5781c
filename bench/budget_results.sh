#!/usr/bin/env bash
# The README's 20-minute tables (Results, "At a 20-minute budget"): recipes trained one after another on both cores
# (a -m sweep: 4 jobs of 20 minutes), scored with n=1000; then samplers x guidance and the output stage on the winner.
# Tables land in each evaluation sweep folder (results.md). palette=null: the raw samples (the default, palette=auto,
# snaps sprites to 16 colours each); sampler=ddim: DDIM-25, the default sampler when these were chosen (the samplers
# sweep made DPM-Solver++ 15 the default; the last sweep scores the default settings).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
python train.py -m experiment=sprites_20min objective=eps,v_min_snr data.balanced=false,true hydra.sweep.dir=logs/results/budget20
# the job folders' names hold "=" and ",": each path is quoted for Hydra's override parser
python evaluate.py -m ckpt="$(ls -d logs/results/budget20/*/ | sed "s:/\$::; s:.*:'&':" | paste -sd,)" sampler=ddim guidance=0,2 n=1000 palette=null \
  hydra.sweep.dir=logs/eval/budget20
WIN="'$(ls -d logs/results/budget20/3_*)'"  # objective=v_min_snr data.balanced=true: the default recipe
python evaluate.py -m ckpt="$WIN" n=1000 sampler=ddim,dpmpp,heun guidance=1,2,3 palette=null hydra.sweep.dir=logs/eval/budget20_samplers
python evaluate.py -m ckpt="$WIN" n=1000 guidance=2 sampler=ddim sampler.eta=1.0 palette=null reference=false hydra.sweep.dir=logs/eval/budget20_eta1
python evaluate.py -m ckpt="$WIN" n=1000 sampler=ddim guidance=2 palette=sprite palette_colors=8,16 reference=false hydra.sweep.dir=logs/eval/budget20_palette
python evaluate.py -m ckpt="$WIN" n=1000 sampler=ddim guidance=2 seed=1,2 palette=null reference=false hydra.sweep.dir=logs/eval/budget20_seeds
# the default settings (DPM-Solver++ 15, guidance 2, palette=auto = sprite for the sprites), and raw, at three seeds
python evaluate.py -m ckpt="$WIN" n=1000 sampler=dpmpp guidance=2 palette=sprite,null seed=0,1,2 reference=false hydra.sweep.dir=logs/eval/budget20_dpmpp
