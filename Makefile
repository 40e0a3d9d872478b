# Two commands on a fresh machine (README): `make demo` and `make test`.
# Both create the virtual environment with the pinned dependency set first; nothing else
# is needed. VENV may point elsewhere (CI keeps one per constraints.txt hash).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean

# Re-running pip each time is cheap when everything is satisfied, and it points the
# editable install at *this* checkout (a shared VENV may have served another one).
install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip check

demo: install
	$(BIN)/fedseg demo

test: install
	$(BIN)/python -m pytest

# The quick subset while editing: leaves out tests marked slow (training, FEDn processes).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
