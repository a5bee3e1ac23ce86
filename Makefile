# Two commands a user needs: `make demo` (the main job on embedded defaults)
# and `make test`. Each makes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OMNIGLOT_DIR ?= $(abspath ../shared/data/omniglot)
DATA   ?= $(abspath data/omniglot-shards)
export OMNIGLOT_DIR
# Ray binds to loopback only on a single host (see README, "Local Ray").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export AWS_EC2_METADATA_DISABLED ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast ingest train baseline clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

ingest: venv
	$(BIN)/python -m workflows.ingest --source "$(OMNIGLOT_DIR)" --dest "$(DATA)"

# Train the CPU preset with Ray Train and score the best epoch on the 400 test trials.
# One worker with 2 threads suits a 2-core machine; TRAIN_ARGS="--workers 4 ..." on bigger ones.
TRAIN_ARGS ?= --workers 1
train: venv
	$(BIN)/python -m workflows.train --recipe demo --data "$(DATA)" --storage-path "$(abspath runs)" $(TRAIN_ARGS)

# The 1-nearest-neighbour pixel baseline on the same 400 test trials.
baseline: venv
	$(BIN)/python -m workflows.evaluate --data "$(DATA)" --model pixel-nn

demo: ingest train

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) data mlflow.db mlartifacts .pytest_cache
