# The two entry points for a new user: `make quickstart` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build; any other torch spec pulls
# gigabytes of CUDA), then bridgevlm with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/quickstart

.PHONY: quickstart test install clean

quickstart: $(VENV)/.installed
	$(VENV)/bin/bridgevlm quickstart --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) runs
