# The same commands locally and in CI. Each bootstraps what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench chaos lint browser-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Headless Chromium for the browser tests, from Debian's packages (only when missing).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "WARNING: could not install chromium; browser tests will be skipped"; }

demo: $(STAMP)
	$(BIN)/dragoman demo

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run --out docs/benchmarks.md

# The fault suite (real processes under load, one fault at a time); writes docs/reliability.md and
# exits non-zero when a fault loses, duplicates or leaks anything. CI runs the short version
# (tests/e2e/test_chaos_quick.py).
chaos: $(STAMP)
	$(BIN)/python -m chaos --out docs/reliability.md

lint: $(STAMP)
	$(BIN)/ruff check src tests bench chaos

clean:
	rm -rf $(VENV) .pytest_cache artifacts
