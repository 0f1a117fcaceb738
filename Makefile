# transferlab: `make demo` and `make test` work from a fresh clone; both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slurm lint format bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/transferlab demo

# Two test processes (pytest-xdist) of one thread each: most of a test is single-threaded Python (imports,
# Hydra, Lightning's loop, tensors of a few pixels), so two processes keep both cores busy; two threads each
# oversubscribe the cores (measured on 2 cores: 328 s in one process, 201 s like this, 630 s with 2 threads each)
TEST_PROCESSES ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)

# against a real SLURM scheduler: a single-node cluster on this machine (installs slurm-wlm and munge; root)
test-slurm: install
	scripts/slurm_cluster.sh
	$(BIN)/python -m pytest -p no:xdist tests/slurm/slurm_checks.py $(PYTEST_ARGS)   # one at a time: one cluster

bench: install
	$(BIN)/python benchmarks/scan_folder.py
	$(BIN)/python benchmarks/feature_cache.py
	$(BIN)/python benchmarks/after_training.py   # predict images/s, ONNX Runtime vs PyTorch, calibration
	$(BIN)/python benchmarks/overhead.py         # train.py against a plain PyTorch loop, whole process

# on a GPU machine: ResNet-50 training images/s, fp32/bf16-mixed/16-mixed x NCHW/NHWC x eager/compiled on
# cached tensors, then bf16 NHWC from JPEG files through the training DataModule (experiments/scale/README.md)
GPU_BENCH := $(BIN)/python benchmarks/throughput.py --backbone resnet50 --batch-size 256 --cudnn-benchmark on \
	--out experiments/scale/throughput.jsonl
bench-gpu: install
	$(GPU_BENCH) --precision 32-true bf16-mixed 16-mixed --memory-format nchw nhwc
	$(GPU_BENCH) --precision 32-true bf16-mixed 16-mixed --memory-format nhwc --compile on
	$(GPU_BENCH) --precision bf16-mixed --memory-format nhwc --compile off on --data files --steps 60

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
