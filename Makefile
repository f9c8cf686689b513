# Set-up, main job and tests on a fresh machine. Everything goes into $(VENV) (./.venv).
# PYTHON: the interpreter the venv is made from, a name on PATH or a path, e.g.
#   make test PYTHON=python3.13
#   make test PYTHON=$$(pyenv root)/versions/3.13.0/bin/python3.13 VENV=.venv313
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The venv is rebuilt from scratch when PYTHON is another version than the one it was made with.
PYTHON_VERSION := $(shell $(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null)
STAMP := $(VENV)/.installed-python$(PYTHON_VERSION)
# Where tools/install_detectron2.py takes detectron2 from (docs/install.md): auto (the official
# repository at the tested commit, else the v0.6 fallback), git, pypi-v0.6, a source folder or
# tarball (DETECTRON2_SHA256: its checksum), or git+URL@COMMIT. E.g. upstream main offline:
#   make test VENV=.venv-main DETECTRON2_SOURCE=../shared/vendor/detectron2-02b5c4e2.tar.gz
DETECTRON2_SOURCE ?= auto
DETECTRON2_SHA256 ?=
# The main job's output (checkpoints, metrics.json, TensorBoard events, COCO results).
DEMO_OUT ?= output/demo
DEMO_CONFIG := configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml

.PHONY: venv test test-fast demo lint clean benchmark

venv: $(STAMP)

$(STAMP): setup.py requirements.txt tools/install_detectron2.py tools/detectron2_pure/_C.py
	@test -n "$(PYTHON_VERSION)" || { echo "PYTHON=$(PYTHON) is not a Python interpreter" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	# pip 26 refuses the pb1-detectron2 sdist ("Distributions from PyPI cannot declare direct
	# URL dependencies": its "all" extra), which the detectron2 fallback downloads.
	$(PY) -m pip install --upgrade "pip>=23,<26"
	$(PY) -m pip install -c requirements.txt $(TORCH_PINS)
	$(PY) -m pip install -r requirements.txt
	$(PY) tools/install_detectron2.py --source "$(DETECTRON2_SOURCE)" \
		$(if $(DETECTRON2_SHA256),--sha256 $(DETECTRON2_SHA256))
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m ruff check mabn_d2 tools dev studies tests configs
	$(PY) -m pytest -q -ra --durations=15 tests

# Everything but the end-to-end tests (child processes, training, command-line runs) and the
# CUDA tier: about 2 minutes on 2 cores (docs/testing.md).
test-fast: venv
	$(PY) -m ruff check mabn_d2 tools dev studies tests configs
	$(PY) -m pytest -q -ra --durations=10 -m "not e2e and not cuda" tests

# CPU threads of the demo: every core this process may use (its expected range,
# configs/demo/expected_results.json, was measured so). OpenMP's wait policy does not change
# the arithmetic, only the speed: auto = ACTIVE when the cores are free at the start, PASSIVE
# when other work holds them (spinning threads then stall: dev/demo_cpu.py has the numbers).
DEMO_THREADS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || nproc)
DEMO_WAIT_POLICY ?= auto
# e.g. make demo SEED=1 (default: the config's SEED 0); DEMO_OPTS: more cfg overrides, shell-quoted
# where needed (DEMO_OPTS="SOLVER.MAX_ITER 300 SOLVER.STEPS '(200,)'"); such a run is not placed in
# the expected range (dev/demo_report.py).
SEED ?=
DEMO_OPTS ?=
demo: venv
	@policy=$$($(PY) dev/demo_cpu.py --policy "$(DEMO_WAIT_POLICY)") || exit 1; \
	mkdir -p $(DEMO_OUT) && echo $$policy > $(DEMO_OUT)/wait_policy.txt; \
	start=$$(date +%s); \
	OMP_NUM_THREADS=$(DEMO_THREADS) OMP_WAIT_POLICY=$$policy $(PY) tools/train_net.py --config-file $(DEMO_CONFIG) \
		OUTPUT_DIR $(DEMO_OUT) $(if $(SEED),SEED $(SEED)) $(DEMO_OPTS) && \
	echo $$(( $$(date +%s) - start )) > $(DEMO_OUT)/train_and_evaluate_seconds.txt
	# Pictures: 8 held-out images, ground truth (left) beside the predictions (right).
	OMP_NUM_THREADS=$(DEMO_THREADS) OMP_WAIT_POLICY=$$(cat $(DEMO_OUT)/wait_policy.txt) $(PY) tools/predict.py --config-file $(DEMO_CONFIG) \
		--dataset mabn_demo_shapes_val --num-images 8 --output $(DEMO_OUT)/predictions \
		--opts MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth > $(DEMO_OUT)/predictions.txt
	@echo "prediction pictures: $(DEMO_OUT)/predictions/ (detections: $(DEMO_OUT)/predictions.txt)"
	$(PY) tools/plot_training_curves.py $(DEMO_OUT)/metrics.json
	@$(PY) dev/demo_report.py --output-dir $(DEMO_OUT) --threads $(DEMO_THREADS) \
		--wait-policy $$(cat $(DEMO_OUT)/wait_policy.txt) --config-file $(DEMO_CONFIG) \
		--overrides "$(DEMO_OPTS)" \
		--seconds $$(cat $(DEMO_OUT)/train_and_evaluate_seconds.txt)

# Speed/memory of MABN vs BN/GN (docs/speed.md); e.g. make benchmark BENCH_ARGS=--quick
BENCH_ARGS ?=
benchmark: venv
	$(PY) studies/benchmark.py $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check mabn_d2 tools dev studies tests configs

clean:
	rm -rf $(VENV) output build

# ---- GPU check (docs/gpu.md). On a machine with the package index: fill the wheelhouse the
# GPU machine lacks, and rehearse the check in a fresh Python 3.12 venv without network.
# On the GPU machine (no network, its own python3): make gpu-check.
GPU_WHEELHOUSE ?= output/gpu_wheelhouse
GPU_CHECK_OUT ?= output/gpu_check
GPU_PYTHON ?= python3
REHEARSAL_PYTHON ?= python3.12
.PHONY: gpu-wheelhouse gpu-check gpu-rehearsal

gpu-wheelhouse: venv
	$(PY) dev/gpu_wheelhouse.py --out $(GPU_WHEELHOUSE)

gpu-check:
	$(GPU_PYTHON) dev/gpu_check.py --wheelhouse $(GPU_WHEELHOUSE) --out $(GPU_CHECK_OUT)

gpu-rehearsal: gpu-wheelhouse
	$(PY) dev/gpu_rehearsal.py --python $(REHEARSAL_PYTHON) --wheelhouse $(GPU_WHEELHOUSE)
