# Two commands on a fresh machine (README): `make demo` and `make test`.
# Both create the virtual environment with the pinned dependency set first; nothing else
# is needed. VENV may point elsewhere (CI keeps one per constraints.txt hash).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo dp-study test test-fast lint clean

# Re-running pip each time is cheap when everything is satisfied, and it points the
# editable install at *this* checkout (a shared VENV may have served another one).
install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip check

demo: install
	$(BIN)/fedseg demo

# The DP recipe study of docs/findings.md (~1 h 30 min on a shared 2-core machine): the
# four sweeps one after another (each resumable), then the report with the curve (the
# baselines sweep's own federated points replicate the curve's and are left out of it).
RUNS ?= runs
dp-study: install
	$(BIN)/fedseg sweep experiments/sweeps/dp-study-nodp.yaml --runs-dir $(RUNS)
	$(BIN)/fedseg sweep experiments/sweeps/dp-study-ablations.yaml --runs-dir $(RUNS)
	$(BIN)/fedseg sweep experiments/sweeps/dp-study-curve.yaml --runs-dir $(RUNS)
	$(BIN)/fedseg sweep experiments/sweeps/dp-study-baselines.yaml --runs-dir $(RUNS)
	$(BIN)/fedseg analyze $(RUNS)/dp-study-nodp/*-s* $(RUNS)/dp-study-ablations/*-s* \
	  $(RUNS)/dp-study-curve/*-s* $(RUNS)/dp-study-baselines/*-pooled \
	  $(RUNS)/dp-study-baselines/*-local --out $(RUNS)/dp-study-report

test: install
	$(BIN)/python -m pytest

# The quick subset while editing: leaves out tests marked slow (training, FEDn processes).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
