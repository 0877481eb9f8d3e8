# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and install axs-lib with every extra, at the exact versions of constraints.txt. pip's own
# output stays visible (no -q): when a resolve fails, its message is the one thing worth reading.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.axs-installed
PIP_FLAGS ?= --progress-bar off

.PHONY: install demo test soak bench check-install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m axs_lib.demo

# The linter first (seconds; its rules are in pyproject.toml), then the suite. Prints the ten
# slowest tests and the suite's wall time, so a slow test is seen when it lands.
test: install
	@start=$$(date +%s); \
	$(VENV)/bin/ruff check --quiet . || exit $$?; \
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=10; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s wall time, exit $$status"; \
	exit $$status

soak: install
	$(PY) -m pytest -q -s -m slow  # -s: the kill harness prints its replay line and each kill

bench: install
	$(PY) -m benchmarks

# Build the wheel and install it into fresh venvs for each supported Python; see tools/check_install.sh.
check-install:
	tools/check_install.sh

clean:
	rm -rf $(VENV) demo build *.egg-info
