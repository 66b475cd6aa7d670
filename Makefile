# The front door: `make demo` runs the main job on the embedded default, `make test` the tests.
# Both create the virtual environment first (torch 2.13.0 before the project, so pip pulls no CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
RLSC := $(VENV)/bin/rlsc
EXTRAS ?= dev

export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export DO_NOT_TRACK = true
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test lint clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(RLSC) run --config params.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check rlsc tests

clean:
	rm -rf outputs .pytest_cache
