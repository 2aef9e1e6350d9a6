# tokenline: `make demo` runs the main job end to end, `make test` runs the whole suite.
# Both create the virtual environment and install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenline-installed
DEMO_DIR ?= out/demo

.PHONY: setup system-deps browser-deps test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so that no extra pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Real services the tests start themselves (Debian packages; installed when missing).
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
	  echo "installing mosquitto (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	fi

# A real headless browser for central's page test (only `make test` needs it).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing chromium + chromium-driver (Debian packages; central's page test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# Two workers (CI has 2 cores; most tests wait on real processes), a test file's tests on one worker.
test: setup system-deps browser-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile

demo: setup system-deps
	$(BIN)/python -m demo --out $(DEMO_DIR)

clean:
	rm -rf out .pytest_cache
