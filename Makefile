# Two commands a user needs: `make demo` (the main job on embedded defaults)
# and `make test`. Each makes its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The raw Omniglot archives: OMNIGLOT_DIR when given, else ../shared/data/omniglot when it
# exists, else the official archives, downloaded once, checked against their digests and cached.
SHARED_OMNIGLOT := $(abspath ../shared/data/omniglot)
OMNIGLOT_DIR ?= $(if $(wildcard $(SHARED_OMNIGLOT)/images_background.zip),$(SHARED_OMNIGLOT),official)
DATA   ?= $(abspath data/omniglot-shards)
export OMNIGLOT_DIR
# Ray binds to loopback only on a single host (docs/cluster.md, "Local Ray cluster").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export AWS_EC2_METADATA_DISABLED ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast ingest train tune baseline clean

# pip's own output goes to .venv/install.log (shown only when the install fails).
$(BIN)/.installed: pyproject.toml
	@echo "setting up $(VENV) (the first time takes a few minutes; log in $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@{ $(BIN)/pip install --upgrade pip && $(BIN)/pip install -e ".[dev]"; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "pip install failed: see $(VENV)/install.log"; exit 1; }
	@touch $@

venv: $(BIN)/.installed

ingest: venv
	@$(BIN)/python -m workflows.ingest --source "$(OMNIGLOT_DIR)" --dest "$(DATA)"

# Train the CPU preset with Ray Train and score the best epoch on the 400 test trials.
# One worker with 2 threads suits a 2-core machine; TRAIN_ARGS="--workers 4 ..." on bigger ones.
# Each run gets a new name (re-using a name resumes that run; a finished one is refused).
TRAIN_ARGS ?= --workers 1
RUN_NAME ?= demo-$(shell date +%Y%m%d-%H%M%S)
train: venv
	@$(BIN)/python -m workflows.train --recipe demo --data "$(DATA)" --storage-path "$(abspath runs)" \
		--name "$(RUN_NAME)" $(TRAIN_ARGS)

# A small Ray Tune search on the CPU preset (Optuna TPE + ASHA); the best config is
# written to runs/$(TUNE_NAME)-best.yaml. Resume an interrupted search: make tune TUNE_NAME=<its name>.
TUNE_NAME ?= search-$(shell date +%Y%m%d-%H%M%S)
TUNE_ARGS ?= --samples 10 --concurrent 2 --epochs 8 --set pairs.pairs_per_epoch=5000 \
	--set training.threads=1 --set cluster.workers=1 --set training.time_budget_s=none
tune: ingest
	$(BIN)/python -m workflows.tune --recipe demo --data "$(DATA)" --storage-path "$(abspath runs)" \
		--name "$(TUNE_NAME)" --best-config "$(abspath runs)/$(TUNE_NAME)-best.yaml" $(TUNE_ARGS)

# The 1-nearest-neighbour pixel baseline on the same 400 test trials.
baseline: venv
	$(BIN)/python -m workflows.evaluate --data "$(DATA)" --model pixel-nn

demo: ingest train

# The whole suite (real Ray, S3-compatible server, MLflow); prints how long it took.
test: venv
	@start=$$(date +%s); $(BIN)/python -m pytest -q; status=$$?; \
		echo "make test: $$(( $$(date +%s) - start ))s"; exit $$status

# The unit tests: no Ray cluster, no servers (a few minutes on 2 cores).
test-fast: venv
	@start=$$(date +%s); $(BIN)/python -m pytest -q -m "not integration"; status=$$?; \
		echo "make test-fast: $$(( $$(date +%s) - start ))s"; exit $$status

clean:
	rm -rf $(VENV) data mlflow.db mlartifacts .pytest_cache
