# ood_det: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= shapes_energy_cfl.yaml
DEMO_OUTPUT ?= output/demo
# The demo's trunk trains half the benchmark's schedule, so that the demo fits 12 minutes on 2 CPU cores.
DEMO_OPTS ?= MODEL.OOD.TRUNK.OPTS "['SOLVER.MAX_ITER', '800', 'SOLVER.STEPS', '(600, 720)']"
GPU_CHECK_OUTPUT ?= output/gpu_check
# Where the synthetic shapes are generated (detectron2's convention: $DETECTRON2_DATASETS, else ./datasets);
# expanded when a recipe runs, after `setup`.
SHAPES = $(shell $(PY) -c "from ood_det.data.synthetic import shapes_dir; print(shapes_dir())" 2>/dev/null)

.PHONY: setup demo test lint gpu-check clean

setup:  ## create .venv and install torch, detectron2 and ood_det (idempotent)
	bash scripts/setup_env.sh

demo: setup  ## train on the synthetic shapes on CPU, calibrate, evaluate, draw OOD boxes on a few images
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT) $(DEMO_OPTS)
	$(PY) tools/visualize_ood.py --config-file $(DEMO_CONFIG) --output $(DEMO_OUTPUT)/pictures \
		--input '$(SHAPES)/ood/ood_00000[0-3].png' '$(SHAPES)/test/test_00000[0-3].png' \
		--opts MODEL.WEIGHTS $(DEMO_OUTPUT)/model_final.pth
	@echo "Demo done: results in $(DEMO_OUTPUT)/ood_results.json, plots $(DEMO_OUTPUT)/ood_*.png, pictures in $(DEMO_OUTPUT)/pictures/"

test: setup  ## run the test suite
	$(PY) -m pytest -q tests

lint: setup  ## lint and import order (ruff, configured in ruff.toml)
	$(PY) -m ruff check .

# On a machine whose Python already holds torch and detectron2 (no network): make gpu-check NO_SETUP=1 PY=python3
gpu-check: $(if $(NO_SETUP),,setup)  ## on a CUDA GPU: CUDA tests, a full shapes run, pictures, cost, real-config step time
	$(PY) tools/gpu_check.py --output $(GPU_CHECK_OUTPUT)

clean:  ## remove outputs (the venv and generated datasets stay)
	rm -rf output
