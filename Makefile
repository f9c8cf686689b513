# Set-up, main job and tests on a fresh machine. Everything goes into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The main job's output (checkpoints, metrics.json, TensorBoard events, COCO results).
DEMO_OUT ?= output/demo

.PHONY: venv test demo lint clean benchmark

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt tools/install_detectron2.py tools/detectron2_pure/_C.py
	$(PYTHON) -m venv $(VENV)
	# pip 26 refuses to download the pb1-detectron2 sdist (its "all" extra has a URL dependency).
	$(PY) -m pip install "pip>=23,<26"
	$(PY) -m pip install -c requirements.txt $(TORCH_PINS)
	$(PY) -m pip install -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m ruff check mabn_d2 tools tests
	$(PY) -m pytest -q -ra tests

# CPU threads of the demo. On a busy 2-core machine two OpenMP threads stall each other
# (measured side by side under a load of ~7: 18 s/iteration with 2 threads, 3 s with 1);
# on an idle machine DEMO_THREADS=2 may be faster.
DEMO_THREADS ?= 1
DEMO_CONFIG := configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml
demo: venv
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) tools/train_net.py \
		--config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUT)
	# Pictures: 8 held-out images, ground truth (left) beside the predictions (right).
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) tools/predict.py --config-file $(DEMO_CONFIG) \
		--dataset mabn_demo_shapes_val --num-images 8 --output $(DEMO_OUT)/predictions \
		--opts MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth > $(DEMO_OUT)/predictions.txt
	@echo "prediction pictures: $(DEMO_OUT)/predictions/ (detections: $(DEMO_OUT)/predictions.txt)"
	$(PY) tools/plot_training_curves.py $(DEMO_OUT)/metrics.json

# Speed/memory of MABN vs BN/GN (docs/speed.md); e.g. make benchmark BENCH_ARGS=--quick
BENCH_ARGS ?=
benchmark: venv
	$(PY) tools/benchmark.py $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check mabn_d2 tools tests

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
	$(PY) tools/gpu_wheelhouse.py --out $(GPU_WHEELHOUSE)

gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --wheelhouse $(GPU_WHEELHOUSE) --out $(GPU_CHECK_OUT)

gpu-rehearsal: gpu-wheelhouse
	$(PY) tools/gpu_rehearsal.py --python $(REHEARSAL_PYTHON) --wheelhouse $(GPU_WHEELHOUSE)
