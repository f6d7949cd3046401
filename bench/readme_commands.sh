#!/bin/bash
# The README's "Command line" and "Attacks" examples, run as written one after another in a scratch folder and
# timed (the bar: each <= 30 min on this CPU). robust-jem is this checkout's .venv/bin/robust-jem; --no-progress
# only keeps progress bars out of the logs. Usage: bash bench/readme_commands.sh [SCRATCH] > bench/results/...
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${1:-$(mktemp -d)}
export PATH=$ROOT/.venv/bin:$PATH
cd "$SCRATCH" || exit 2
t() {
  local s e rc
  s=$(date +%s.%N); "$@" > "log.$(date +%s%N).txt" 2>&1; rc=$?; e=$(date +%s.%N)
  printf "%7.1f s  rc=%d  %s\n" "$(echo "$e - $s" | bc)" "$rc" "$*"
}
echo "# $(date -u +%FT%TZ), git $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, scratch $SCRATCH"
t robust-jem train --objective jem --dataset fashion-mnist --preset quick --out runs/quick-jem --no-progress
t robust-jem train --objective ce  --preset quick --out runs/quick-ce --no-progress
t robust-jem train --objective pgd-at --preset quick --out runs/quick-pgd-at --no-progress
t robust-jem train --resume runs/quick-jem
t robust-jem train --objective jem --sgld-init class-gaussian --sgld-grad-clip 1 --out runs/quick-jem-clip --no-progress
t python -m robust_jem --help
t robust-jem pgd --norm linf --eps 8/255 --steps 10 --checkpoint runs/quick-jem/final.pt --sgld-steps 0,1 \
  --grad-mode full,bpda --restarts 2 --n-examples 50 --no-progress
t robust-jem health --checkpoint runs/quick-jem/final.pt --judge runs/quick-ce/final.pt
t robust-jem report results/pgd-quick-jem-linf
t robust-jem autoattack --norm linf --eps 0.1 --checkpoint runs/quick-pgd-at/final.pt --n-examples 50 --no-progress
t robust-jem blackbox --attack boundary --checkpoint runs/quick-ce/final.pt --n-examples 100 --no-progress
t robust-jem plot results/pgd-quick-jem-linf
t robust-jem study --preset tiny --no-progress
