# Two commands for a new user: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
MLFLOW_DB := $(CURDIR)/mlflow.db

.PHONY: install demo test gpu-check ui lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cascadelab demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# CUDA tests + bench operators/objectives/train on the GPU, one table; says so and exits 0 without a GPU
gpu-check: $(STAMP)
	$(PY) -m cascadelab.jobs.gpu_check

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui \
		--backend-store-uri sqlite:///$(MLFLOW_DB) --host 127.0.0.1 --port 5000 --workers 1

lint: $(STAMP)
	$(VENV)/bin/ruff check cascadelab tests

clean:
	rm -rf data/demo results
