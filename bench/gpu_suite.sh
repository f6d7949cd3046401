#!/usr/bin/env bash
# GPU benchmark suite (issue 8): JEM train-step throughput/MFU and attack throughput on one CUDA device,
# each against its reference-style loop in the same process. Prepared for a lent GPU machine; one short run.
#
#   bash bench/gpu_suite.sh            # CUDA, paper scale (WRN-28-10, batch 64, 20 SGLD steps) + quick model
#   bash bench/gpu_suite.sh --tiny     # seconds-long smoke run of the same commands (CPU is fine)
#
# Writes into $OUT when set (the device tool's output folder), else bench/results/. Every bench's log goes
# to gpu_suite.log there; a failing bench is recorded and the suite goes on (exit code 1 at the end).
#
# The target machine: Python 3.12, torch 2.11 CUDA, numpy, click, tqdm, matplotlib, safetensors, no internet,
# and NO foolbox / eagerpy / GitPython / torchattacks. Nothing is installed from the network here:
#   * the train-step bench needs only torch (robust_jem imports no attack library);
#   * the attack bench imports torchattacks: carry its wheel (and any missing needs) in an ignored .whl/
#     folder, e.g. here: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#     --platform manylinux2014_x86_64 -d .whl torchattacks==3.5.1 (scipy/requests are already there);
#     this script installs .whl/*.whl with --no-index into /tmp/site. Without it the attack bench is skipped.
#   * Fashion-MNIST (for the quick-model benches): copy the four IDX .gz files into an ignored .data/fashion-mnist/
#     and carry .data; ROBUST_JEM_DATA points there. The paper-scale bench uses synthetic CIFAR-shaped data.
# Device tool call:  run(command="bash bench/gpu_suite.sh", carry=[".whl", ".data", "runs/quick-ce/final.pt",
#                      "runs/quick-pgd-at/final.pt", "runs/quick-jem/final.pt"], timeout_s=600)
#                    (the checkpoints, 47 MB, only for the bf16 attack check; carry allows 64 MiB in all)
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY="${PY:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
RES="${OUT:-$ROOT/bench/results}"
mkdir -p "$RES"
LOG="$RES/gpu_suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ -d .data/fashion-mnist ]]; then export ROBUST_JEM_DATA="$ROOT/.data/fashion-mnist"; fi

DEV=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if (( TINY )); then DEV=cpu; else echo "gpu_suite: no CUDA device (use --tiny to smoke-test on CPU)" >&2; exit 2; fi
fi

FAILED=()
step() {  # step NAME TIMEOUT_S CMD...: run, log, remember failures
    local name="$1" limit="$2"; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    (( rc == 0 )) || FAILED+=("$name")
}

{
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; nvidia-smi -L 2>/dev/null || true
    "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee -a "$LOG" > "$RES/gpu_suite-env.txt"

if (( TINY )); then
    TRAIN_PAPER=(--arch wrn --depth 10 --width 1 --batch-size 8 --sgld-steps 2 --repeats 1 --steps 1 --warmup 1
                 --variants reference,ours,bf16 --data synthetic --tag "tiny-$DEV-wrn")
    TRAIN_SMALL=(--batch-size 8 --sgld-steps 2 --repeats 1 --steps 1 --warmup 1 --variants reference,ours
                 --data synthetic --no-bf16-check --tag "tiny-$DEV-small")
    ATTACK=(--sgld-steps 1 --n-chains 2 --steps 1 --n-batched 2 --n-loop 1 --n-bare 4)
else
    # paper scale: every option on and off (fp32 = TF32 convs; fused Adam and prefetch are the trainer's defaults)
    # (synthetic CIFAR-shaped data: no CIFAR-10 there, and torchvision would try to download it)
    TRAIN_PAPER=(--paper --repeats 5 --steps 4 --warmup 3 --data synthetic
                 --variants reference,ours,nocl,nofused,noprefetch,bf16,bf16+compile)
    TRAIN_SMALL=(--repeats 5 --steps 10 --warmup 3 --variants reference,ours,nocl,bf16 --data auto)
    ATTACK=()
fi

step train-step-paper 330 "$PY" bench/train_step.py --device "$DEV" "${TRAIN_PAPER[@]}" --out "$RES"
step train-step-small 90 "$PY" bench/train_step.py --device "$DEV" "${TRAIN_SMALL[@]}" --out "$RES"

if [[ ! -f bench/attack_throughput.py ]]; then
    echo "=== attack-throughput: skipped (bench/attack_throughput.py not present)" | tee -a "$LOG"
elif ! "$PY" -c "import torchattacks" 2>/dev/null; then
    echo "=== attack-throughput: skipped (torchattacks not importable: carry its wheel in .whl/)" | tee -a "$LOG"
else
    # --paper when the attack bench grows a paper-scale mode; ATTACK_ARGS adds anything else.
    if (( ! TINY )) && "$PY" bench/attack_throughput.py --help 2>/dev/null | grep -q -- "--paper"; then
        ATTACK+=(--paper)
    fi
    # shellcheck disable=SC2086
    step attack-throughput 140 "$PY" bench/attack_throughput.py --device "$DEV" "${ATTACK[@]}" ${ATTACK_ARGS:-} \
        --out "$RES"
fi

# bf16 must not weaken the attack on the GPU either: needs the quick checkpoints (carried) and torchattacks
if (( ! TINY )) && [[ -f runs/quick-jem/final.pt && -f runs/quick-ce/final.pt && -f runs/quick-pgd-at/final.pt ]] \
        && "$PY" -c "import torchattacks" 2>/dev/null; then
    step attack-precision 150 "$PY" bench/attack_precision.py --device "$DEV" --out "$RES"
else
    echo "=== attack-precision: skipped (needs runs/quick-{ce,pgd-at,jem}/final.pt and torchattacks)" | tee -a "$LOG"
fi

# exact gradients through long chains at bounded memory (issue 28): peak memory and time vs k, plain vs checkpointed
if (( TINY )); then
    step chain-memory 60 "$PY" bench/chain_memory.py --device "$DEV" --steps 2,8 --batch 1 --chains 2 --out "$RES" \
        --tag "-tiny"
else
    step chain-memory 120 "$PY" bench/chain_memory.py --device "$DEV" --steps 10,100,1000 --batch 8 --chains 5 \
        --out "$RES"
fi

if (( ${#FAILED[@]} )); then
    echo "gpu_suite: failed: ${FAILED[*]} (see $LOG)" | tee -a "$LOG"
    exit 1
fi
echo "gpu_suite: done; results in $RES" | tee -a "$LOG"
