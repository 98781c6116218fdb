# The two entry points for a new user: `make quickstart` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build; any other torch spec pulls
# gigabytes of CUDA), then bridgevlm with its extras. `make test` also installs Chromium and ChromeDriver
# (the Debian packages chromium and chromium-driver, through apt-get) when they are missing: the chat
# page's test drives a headless browser.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/quickstart

.PHONY: quickstart test install browser clean

quickstart: $(VENV)/.installed
	$(VENV)/bin/bridgevlm quickstart --out $(OUT)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

install: $(VENV)/.installed

browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "installing chromium and chromium-driver for the chat page's test"; \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) runs
