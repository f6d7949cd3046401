#!/usr/bin/env bash
# robust-jem: the two commands.
#   ./run_all.sh [--preset quick|standard|cifar10-paper] [--name RUN]   set up, then run the study
#   ./run_all.sh test                                          set up, then run the test suite
#   ./run_all.sh setup                                         set up only
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.robust-jem-setup"

log() { printf '[run_all] %s\n' "$*" >&2; }

setup() {
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    log "environment .venv is complete"
  else
    [ -x "$PY" ] || { log "creating .venv"; python3 -m venv "$VENV"; }
    local pip_log="$VENV/pip.log"
    pip() { "$PY" -m pip install -q "$@" >>"$pip_log" 2>&1 || { cat "$pip_log" >&2; log "pip install $* failed"; exit 1; }; }
    # A CPU machine must not fetch a multi-GB CUDA torch: install the pinned build first,
    # and keep any torch that is already there (a GPU user's own build).
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
      log "installing $TORCH_PIN"
      pip "$TORCH_PIN"
    fi
    # torchattacks declares torchvision but never imports it; pip's resolver
    # then reports that conflict in $pip_log, which is expected.
    pip --no-deps "torchattacks==3.5.1"
    log "installing robust-jem and its dependencies"
    pip -e ".[test]"
    "$PY" -c "import torch, torchattacks, foolbox, click, matplotlib, safetensors" ||
      { log "the environment is incomplete (see $pip_log)"; exit 1; }
    echo "$want" > "$STAMP"
    log "environment ready"
  fi
  find_data
}

find_data() {
  local dir=()
  [ -n "${DATA_DIR:-}" ] && dir=(--data-dir "$DATA_DIR")
  if "$PY" -m robust_jem data-check --dataset fashion-mnist "${dir[@]}" >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    log "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) ||
      log "could not install dataset-fashion-mnist"
  fi
  "$PY" -m robust_jem data-check --dataset fashion-mnist "${dir[@]}"
}

# --data-dir DIR (or --data-dir=DIR) among the study's arguments also tells the set-up where the data is
DATA_DIR=""
prev=""
for arg in "$@"; do
  case "$arg" in
    --data-dir=*) DATA_DIR="${arg#--data-dir=}" ;;
    *) [ "$prev" = "--data-dir" ] && DATA_DIR="$arg" ;;
  esac
  prev="$arg"
done

cmd="${1:-run}"
case "$cmd" in
  setup) setup ;;
  test)
    shift
    setup
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    setup
    exec "$PY" -m robust_jem study "$@"
    ;;
esac
