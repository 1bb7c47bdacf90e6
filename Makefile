# gptlaunch's front door. `make run` trains a small sweep on this machine; `make test` runs the tests.
# Both set everything up first: the virtual environment (torch pinned to the CPU wheel, or its CUDA build on a machine
# with an NVIDIA GPU) and the data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEXT := data/tinyshakespeare/input.txt
SHARED_TEXT ?= ../shared/data/tinyshakespeare/input.txt
ARGS ?=
# Test workers (pytest-xdist), each with a local Slurm cluster of its own: instances BASE..BASE+WORKERS-1 of
# slurm/local_cluster.sh (BASE: GPTLAUNCH_CLUSTER_INSTANCE, default 0, the cluster a user starts by hand). The
# slurm tests mostly wait on the scheduler: three workers keep to them and a fourth overlaps their waiting with the
# CPU-bound tests (tests/scheduling.py). Since the tests' local launches run in their worker's process (no interpreter
# and rank server each), the Slurm tests' 3,600 s of waiting were the longest part on two Slurm workers.
WORKERS ?= 4
INSTANCES = $(shell seq $${GPTLAUNCH_CLUSTER_INSTANCE:-0} $$(( $${GPTLAUNCH_CLUSTER_INSTANCE:-0} + $(WORKERS) - 1 )))
# The main command: a small sweep on this machine (1 and 2 ranks of the default model) that trains,
# checkpoints, and ends in the scaling report and its TensorBoard dashboard.
RUN_ARGS ?= -m nodes=1,2 strategy=ddp train.max_steps=1000

# torch's build: `cuda` where nvidia-smi answers with a GPU, from PyTorch's index for CUDA (cu128, as environment.yml;
# CUDA=cu126 for an older driver: nvidia-smi shows the newest CUDA it runs), the version constraints.txt pins; else
# (CI too) `cpu`, the wheel constraints.txt pins, and no CUDA package. TORCH_BUILD=cpu keeps a GPU machine on it.
ifndef TORCH_BUILD
TORCH_BUILD := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu)
endif
CUDA ?= cu128
TORCH_PIN = $(shell grep '^torch==' constraints.txt)

.PHONY: setup data cluster cluster-down run lint test test-fast clean constraints

setup: $(VENV)/.installed-$(TORCH_BUILD)

# the build in the stamp's name: a CPU venv on a GPU machine gets the CUDA build
$(VENV)/.installed-$(TORCH_BUILD): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip  # pip itself as tested, too
	$(if $(filter cuda,$(TORCH_BUILD)),$(BIN)/pip install -q -c constraints.txt \
	  --extra-index-url https://download.pytorch.org/whl/$(CUDA) '$(TORCH_PIN)+$(CUDA)')
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed,tracking,hf,eval,sweep,fp8]'
	# the stock Optuna sweeper an older venv holds would claim hydra/sweeper=optuna too (hydra_plugins/gptlaunch_optuna)
	$(BIN)/pip uninstall -q -y hydra-optuna-sweeper 2>/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

# Every dependency pinned to what the venv holds (after an upgrade the tests passed): what CI and a fresh machine
# install. Keeps the comment at the top of constraints.txt, and torch's pin without its local build tag.
constraints: setup
	{ grep '^#' constraints.txt; echo torch==2.13.0; $(BIN)/pip freeze --all --exclude-editable | grep -v '^torch=='; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt

data: $(TEXT)

$(TEXT):
	@mkdir -p $(dir $@)
	@if [ -f "$(SHARED_TEXT)" ]; then cp "$(SHARED_TEXT)" $@ && echo "copied $(SHARED_TEXT) -> $@"; \
	else echo "Tiny Shakespeare is missing: put it at $@ (it is data/tinyshakespeare/input.txt in the" \
	  "karpathy/char-rnn repository on GitHub), or set SHARED_TEXT=/path/to/input.txt" >&2; exit 1; fi

run: setup data
	$(BIN)/python -m launch $(RUN_ARGS) $(ARGS)

# Real 4-node Slurm clusters on this machine (network namespaces), one per test worker, for the `slurm` tests.
# Needs root.
cluster:
	@if [ "$$(id -u)" = 0 ]; then bash slurm/install_deps.sh && \
	  for i in $(or $(INSTANCES),0); do GPTLAUNCH_CLUSTER_INSTANCE=$$i bash slurm/local_cluster.sh up 4 || exit 1; done; \
	else echo "make cluster: not root, so no local Slurm cluster; the slurm tests will skip (CI fails them)"; fi

# every instance, whichever started it (make cluster, a test worker, a user)
cluster-down:
	bash slurm/local_cluster.sh down --all

lint: setup
	$(BIN)/ruff check .

# The project's bytecode, compiled once: where PYTHONDONTWRITEBYTECODE is set (as on CI's machines) no process
# writes it, and each of the suite's ~1,500 interpreters (launchers, rank servers, Slurm ranks and task wrappers)
# would compile the modules it imports again, 0.05-0.25 CPU-s each.
PYC = $(BIN)/python -m compileall -q -j 0 launch gpt benchmarks hydra_plugins
# pytest keeps each test module as it rewrote its asserts (tests/**/__pycache__) only where bytecode may be written:
# without it every worker parses and rewrites every test module again, a third of its collection (about 4 CPU-s).
PYTEST = env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest
# The venv and the clusters are set up at once: pip keeps one core busy for minutes, apt-get and the clusters' daemons
# the other.
test:
	$(MAKE) -j2 --no-print-directory setup data cluster
	$(MAKE) --no-print-directory lint
	$(PYC)
	$(PYTEST) -n $(WORKERS) $(ARGS)

# The quick slice a contributor runs before a commit: no Slurm, no training through `python -m launch` (such a test
# is marked slow: tests/slow_marks.py), no test that takes more than a few seconds (a subprocess that imports torch
# is one). Three workers on 2 cores: a fourth costs another collection of every test module (about 12 CPU-seconds)
# and gains nothing now that few of these tests wait.
test-fast: setup data
	$(PYC)
	$(PYTEST) -n 3 -m "not slow and not slurm and not gpu" $(ARGS)

clean:
	rm -rf runs multirun outputs data/shakespeare_char data/shakespeare_bpe
