# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and install the pinned dependencies (torch first, so pip takes the CPU wheel on disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.axs-installed

.PHONY: install demo test soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m axs_lib.demo

test: install
	$(PY) -m pytest -q -n 2 -m "not slow"

soak: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) demo build *.egg-info
