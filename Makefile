# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
EFFNET := $(VENV)/bin/effnet
REPO   ?= models
MODELS ?= default
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install models serve test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[build,lite-weights,test]'
	touch $@

install: $(VENV)/.installed

models: install
	$(EFFNET) build --models $(MODELS) --weights auto --repo $(REPO)

serve: models
	EFFNET_REPOSITORY=$(REPO) $(EFFNET) serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
