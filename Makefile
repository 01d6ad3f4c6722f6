# Every target installs what it needs: a fresh machine has only Python, pip and gcc.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
RUN ?= runs/tiny

.PHONY: demo paper test install install-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp files re-run the install when pyproject.toml or the constraints change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/qiusuo demo --run $(RUN) --config configs/demo.yaml

paper: install
	$(BIN)/qiusuo paper --run runs/paper --config configs/paper.yaml

test: install-test
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python bench/demo_time.py

clean:
	rm -rf runs $(VENV)
