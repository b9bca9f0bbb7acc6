# modernbert-train: the README's commands. Targets that need the venv create it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

# The newest stack (requirements/compat.txt) in a second venv. pyenv's python3.12 when installed: its shim
# on PATH refuses to run unless 3.12 is the selected version.
PYTHON_COMPAT ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12 \
	$(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12) python3)
VENV_COMPAT := .venv-compat
BIN_COMPAT := $(VENV_COMPAT)/bin
STAMP_COMPAT := $(VENV_COMPAT)/.installed

.PHONY: install test test-fast test-compat data train eval bench lint format clean wheelhouse device-check device-rehearsal

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole suite, slow end-to-end tests included (CI runs this); the 15 slowest tests are named at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

# Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# The suite but the slow end-to-end tests, on the newest stack (CI runs this after `test`).
test-compat: $(STAMP_COMPAT)
	$(BIN_COMPAT)/python -m pytest -q -n 2 -m "not slow"

$(STAMP_COMPAT): pyproject.toml requirements/compat.txt requirements/compat-no-deps.txt
	test -x $(BIN_COMPAT)/python || $(PYTHON_COMPAT) -m venv $(VENV_COMPAT)
	$(BIN_COMPAT)/pip install --quiet --upgrade pip
	$(BIN_COMPAT)/pip install --quiet -r requirements/compat.txt
	$(BIN_COMPAT)/pip install --quiet --no-deps -r requirements/compat-no-deps.txt
	$(BIN_COMPAT)/pip install --quiet --no-deps -e .
	touch $(STAMP_COMPAT)

# The embedded default corpus, sharded, with a tokenizer trained on it.
data: $(STAMP)
	$(BIN)/python -m data_prep.default_corpus --output data/default

# corpus.json is written last, by the current selection rule: a corpus missing it is built (again).
data/default/corpus.json:
	$(MAKE) data

# The embedded default end to end on CPU: data when missing, train, export, then the run's picture.
train: $(STAMP) data/default/corpus.json
	$(BIN)/modernbert-train yamls/default.yaml
	$(BIN)/modernbert-report runs/default --output runs/default/report.png

# After `make train`: the embedded downstream task (modernbert_train/finetune/keyword_task.py) fine-tuned from
# runs/default/hf and from the same architecture's random init, 3 seeds each; scores in runs/default/eval.json.
eval: $(STAMP)
	$(BIN)/python -m modernbert_train.finetune.embedded_eval runs/default/hf --output runs/default/eval.json

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# The wheels an offline GPU node lacks (benchmarks/wheelhouse.txt) into .whl/, for `make device-check`
# there. Needs the network; WHEELHOUSE_PYTHON is the node's Python version.
WHEELHOUSE_PYTHON ?= 3.12
wheelhouse:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
		--implementation cp --python-version $(WHEELHOUSE_PYTHON) --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		-r benchmarks/wheelhouse.txt
	@du -sh .whl

# Check and time the project on a GPU node in one command, offline (without CUDA: a dry run with the tiny
# preset). Results in OUT (default runs/device-check). Uses .venv's python when there is one, else python3.
DEVICE_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
device-check:
	OUT="$(or $(OUT),runs/device-check)" DEVICE_CHECK_PYTHON="$(DEVICE_CHECK_PYTHON)" \
		bash benchmarks/device_check.sh

# The GPU node rehearsed on this CPU before device time is spent: its image's packages (benchmarks/gpu-image.txt)
# in .venv-image/ (Python 3.12, ~5.5 GB, needs the network), the wheelhouse installed as on the node, then the
# dry run. Results in OUT (default runs/device-rehearsal). Not part of CI.
device-rehearsal: wheelhouse
	test -x .venv-image/bin/python || $(PYTHON_COMPAT) -m venv .venv-image
	.venv-image/bin/pip install --quiet -r benchmarks/gpu-image.txt
	$(MAKE) --no-print-directory device-check DEVICE_CHECK_PYTHON=$(CURDIR)/.venv-image/bin/python \
		OUT="$(or $(OUT),runs/device-rehearsal)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/default .pytest_cache
