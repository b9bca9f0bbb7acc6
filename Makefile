# modernbert-train: the README's commands. Targets that need the venv create it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast data train bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole suite, slow end-to-end tests included (CI runs this).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# The embedded default corpus, sharded, with a tokenizer trained on it.
data: $(STAMP)
	$(BIN)/python -m data_prep.default_corpus --output data/default

data/default/tokenizer/tokenizer.json:
	$(MAKE) data

# The embedded default end to end on CPU: data when missing, train, export.
train: $(STAMP) data/default/tokenizer/tokenizer.json
	$(BIN)/modernbert-train yamls/default.yaml

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/default .pytest_cache
