# The two set-up commands of the README: `make serve` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
# Overridable so GPU hosts can pick a CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.wanserve-installed
TORCH_STAMP := $(VENV)/.torch-spec

.PHONY: help install test lint serve demo clean bench-cpu FORCE

help:
	@echo "make serve      set up .venv (once) and start the service on http://127.0.0.1:8088 (WANSERVE_PORT=...)"
	@echo "make test       set up .venv (once), lint, and run the whole test suite (PYTEST_ARGS='-k ...')"
	@echo "make demo       generate a clip with the tiny model into data/demo.mp4"
	@echo "make lint       ruff check and format check"
	@echo "make bench-cpu  run the benchmark harness on the tiny CPU models into data/bench"
	@echo "make install    only set up .venv (TORCH_SPEC='torch==2.13.0 --index-url ...' picks the torch build)"
	@echo "make clean      remove .venv and data/"

install: $(STAMP)

# Rewritten only when TORCH_SPEC changes: asking for another torch build on an installed tree reinstalls it.
$(TORCH_STAMP): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "wanserve needs Python 3.11 or newer (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# Another build of the same version satisfies `torch==X` as it stands: a changed TORCH_SPEC reinstalls.
	@if [ -f $(VENV)/.torch-installed ] && ! cmp -s $(TORCH_STAMP) $(VENV)/.torch-installed; then \
		echo "TORCH_SPEC changed: reinstalling torch ($(TORCH_SPEC))"; \
		$(BIN)/python -m pip install --quiet --force-reinstall $(TORCH_SPEC); \
	else \
		$(BIN)/python -m pip install --quiet $(TORCH_SPEC); \
	fi
	cp $(TORCH_STAMP) $(VENV)/.torch-installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@command -v redis-server >/dev/null || echo "note: redis-server is not on PATH; the Redis tests need it (Debian: apt-get install redis-server)"
	touch $(STAMP)

LINT_PATHS := $(wildcard src tests benchmarks)

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

# pytest exits 5 when a filter (PYTEST_ARGS="-k ...") selects nothing: say so instead of failing obscurely.
test: install lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): check PYTEST_ARGS"; exit 0; fi; exit $$rc

serve: install
	$(BIN)/wanserve serve

demo: install
	$(BIN)/wanserve generate --model tiny-t2v --prompt "a red fox running through snow" --out data/demo.mp4

# Into data/ (ignored), not benchmarks/results: a check of the harness must not rewrite the committed figures.
bench-cpu: install
	$(BIN)/wanserve bench --cpu-tiny --out data/bench

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
