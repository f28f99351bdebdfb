#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv/ and install
# PyTorch, detectron2 and ood_det with its test extras.
#
# Idempotent: when everything is already in place it only checks and returns.
# Environment variables:
#   PYTHON        interpreter used to create the venv (default: python3.11)
#   VENV          venv location (default: <repo>/.venv)
#   D2_SOURCE     pip requirement for detectron2's official source
#                 (default: git+https://github.com/facebookresearch/detectron2.git)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
D2_SOURCE="${D2_SOURCE:-git+https://github.com/facebookresearch/detectron2.git}"
TORCH_REQ=("torch==2.14.1" "torchvision==0.29.1")
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
STAMP="$VENV/.ood_det_setup"
# The stamp records the inputs of the last successful set-up; when they are
# unchanged and the imports work, there is nothing to do.
STAMP_KEY="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

log() { printf '[setup] %s\n' "$*"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] \
    && "$PY" -c "import torch, torchvision, detectron2, ood_det" 2>/dev/null; then
  log "environment at $VENV is up to date ($("$PY" -m ood_det.env_info --short))"
  exit 0
fi

if [ ! -x "$PY" ]; then
  command -v "$PYTHON" >/dev/null || { echo "[setup] error: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
  log "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || { echo "[setup] error: $VENV is not Python 3.11; remove it and run again" >&2; exit 1; }

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1' or torchvision.__version__.split('+')[0] != '0.29.1')" 2>/dev/null; then
  log "installing ${TORCH_REQ[*]}"
  "${PIP[@]}" install "${TORCH_REQ[@]}"
fi
# detectron2 v0.6's model_zoo imports pkg_resources, which setuptools 81 removed.
"${PIP[@]}" install "setuptools<81" wheel

install_d2_fallback() {
  # pb1-detectron2 0.6 is detectron2 v0.6's Python sources without the C++
  # sources. Install it under detectron2's own distribution name, as pure
  # Python (no extension to build).
  local tmp
  tmp="$(mktemp -d)"
  "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$tmp" "pb1-detectron2==0.6"
  tar -xzf "$tmp"/pb1-detectron2-0.6.tar.gz -C "$tmp"
  "$PY" "$ROOT/scripts/patch_d2_sdist.py" "$tmp/pb1-detectron2-0.6"
  "${PIP[@]}" install --no-build-isolation "$tmp/pb1-detectron2-0.6"
  rm -rf "$tmp"
}

if "$PY" -c "import detectron2" 2>/dev/null; then
  log "detectron2: keeping the installed detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
elif timeout 1800 "${PIP[@]}" install --no-build-isolation "$D2_SOURCE" 2>/dev/null; then
  log "detectron2: installed from the official source ($D2_SOURCE), with compiled ops"
else
  log "detectron2: official source unreachable; installing pb1-detectron2==0.6 (detectron2 v0.6, pure Python, no compiled ops)"
  install_d2_fallback
fi

log "installing ood_det (editable) with test extras"
"${PIP[@]}" install --no-build-isolation -e "$ROOT[test]"

"$PY" -c "import ood_det" || { echo "[setup] error: import ood_det failed" >&2; exit 1; }
echo "$STAMP_KEY" > "$STAMP"
log "done: $("$PY" -m ood_det.env_info --short)"
