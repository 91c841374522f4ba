# The source of truth for setting up, testing and running fulltune.
#   make demo    create .venv, install fulltune, run the whole pipeline locally (kfp.local, tiny model)
#   make test    install the dev extras, run the test suite (slow end-to-end tests included)
#   make lint    ruff lint + format check
#   make compile regenerate pipelines/*.yaml and components/*/ from the code
#   make bench   run the benchmarks (see docs/benchmarks.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in constraints.txt to the CPU wheel development and CI machines carry;
# /opt/wheels is where that wheel lies on them (ignored where it does not exist).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
	$(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PYTEST_ARGS ?=
# The suite runs in one worker process per logical CPU; each takes the next test as it finishes one
# (tests/conftest.py puts the end-to-end tests first). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= logical
PYTEST_WORKERS := -n $(TEST_WORKERS) $(if $(filter 0,$(TEST_WORKERS)),,--dist load --maxschedchunk 1)

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv dev demo test test-fast lint format compile check-compiled clean freeze bench images gpu-check gpu-carry

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# DeepSpeed builds its shared-memory collective op for CPU ranks on first use (~30 s on 2 cores, kept
# in ~/.cache/torch_extensions); building it with the install keeps that out of the first training run.
# With this environment's ninja first on the PATH, as the local launcher's ranks have it (launch/local.py).
$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e .
	PATH="$(abspath $(BIN)):$$PATH" DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import \
		get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev]'
	@touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/fulltune demo $(DEMO_ARGS)

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.dev
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Benchmarks print ratios against a baseline run side by side; figures go in docs/benchmarks.md.
# Each prints its figures and the ratio against its baseline; docs/benchmarks.md has the commands
# and the recorded results. `make bench BENCH=validate_throughput` runs one. plan_memory needs a
# GPU and is not in the default list: `make bench BENCH=plan_memory` on a GPU host.
BENCH ?= validate_throughput preprocess_throughput train_step eval_throughput process_exit compile_time
bench: $(VENV)/.dev
	@for b in $(BENCH); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py $(BENCH_ARGS) || exit 1; done

# Every GPU measurement in one short run (docs/benchmarks.md): make gpu-check OUT=dir [ARGS=--dry-run].
# On the GPU machine it runs on the image's python3; here, on this checkout's virtualenv.
OUT ?= gpu-check-out
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash benchmarks/gpu_check.sh $(OUT) $(ARGS)

# Before a GPU call: the wheels and demo assets the device's image lacks (.whl/, .gpu-assets/).
gpu-carry: $(VENV)/.dev
	PYTHON=$(BIN)/python PYTHONPATH=src bash benchmarks/gpu_carry.sh

compile: $(VENV)/.runtime
	$(BIN)/fulltune compile

check-compiled: compile
	git diff --exit-code -- pipelines components
	@test -z "$$(git status --porcelain -- pipelines components)" || { echo "uncommitted compiled files"; exit 1; }

# Container images (docs/deploy.md): the runtime image every pipeline step runs in, tagged with the
# package version as src/fulltune/_image.py expects, and the trainer image (CUDA, DeepSpeed) for the
# PyTorchJob's pods. Needs docker or podman; the tests do not. Extra flags: IMAGE_BUILD_ARGS=...
IMAGE_REPOSITORY ?= ghcr.io/fulltune/fulltune
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
FULLTUNE_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_LABEL_ARGS = --build-arg VERSION=$(FULLTUNE_VERSION) \
	--build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) \
	--build-arg CREATED=$(shell date -u +%Y-%m-%dT%H:%M:%SZ)

images:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make images: no docker or podman found (set CONTAINER_ENGINE)"; exit 1; }
	$(CONTAINER_ENGINE) build -f images/runtime/Dockerfile $(IMAGE_LABEL_ARGS) $(IMAGE_BUILD_ARGS) \
		-t $(IMAGE_REPOSITORY):$(FULLTUNE_VERSION) .
	$(CONTAINER_ENGINE) build -f images/trainer/Dockerfile $(IMAGE_LABEL_ARGS) $(IMAGE_BUILD_ARGS) \
		-t $(IMAGE_REPOSITORY)-trainer:$(FULLTUNE_VERSION) .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .fulltune-demo

# Re-pin constraints.txt to what the dev environment resolved (after changing dependencies).
freeze: $(VENV)/.dev
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^fulltune' \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
