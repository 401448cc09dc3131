# The only entry points: README, .ci/run and people all call these.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint format typecheck loadtest check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "shopstack needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	SHOPSTACK_ENV=$${SHOPSTACK_ENV:-dev} $(BIN)/shopstack up

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

loadtest: install
	$(BIN)/shopstack loadtest $(if $(TARGET),--target $(TARGET)) $(if $(SLO),--slo $(SLO))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
