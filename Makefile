# ood_det: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= shapes_energy_cfl.yaml
DEMO_OUTPUT ?= output/demo

.PHONY: setup demo test clean

setup:  ## create .venv and install torch, detectron2 and ood_det (idempotent)
	bash scripts/setup_env.sh

demo: setup  ## train on the synthetic shapes benchmark on CPU, evaluate, print the tables
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

test: setup  ## run the test suite
	$(PY) -m pytest -q tests

clean:  ## remove outputs (the venv and generated datasets stay)
	rm -rf output
