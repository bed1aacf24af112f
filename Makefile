# Two commands for a fresh machine: `make demo` and `make test`. Both build (once) and reuse a cached
# environment: a venv with CPU torch, the real ComfyUIs of comfyui_pare/tested_comfyui.py (the pinned 0.3.75 and
# newer upstream trees), their front ends, and this pack linked into it.
PARE_CACHE ?= $(HOME)/.cache/comfyui-pare
export PARE_CACHE
PY := $(PARE_CACHE)/venv/bin/python

.PHONY: env demo test test-fast lint

env:
	@bash scripts/setup_env.sh >/dev/null

demo: env
	$(PY) -m scripts.demo

test: env
	$(PY) -m pytest -q

# Core tests only (no ComfyUI server).
test-fast: env
	$(PY) -m pytest -q -m "not comfy"

lint: env
	$(PY) -m ruff check .
