# The same commands locally and in CI. Each bootstraps what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-quick chaos lint browser-deps clean

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

# Every benchmark in one run (~20 minutes): Dragoman end to end vs BullMQ/arq/Celery/SAQ, serve --workers,
# the cost of WAIT for a replica, 10,000 idle node sockets, the store-level scripts. Installs the peers
# into bench-only folders (.bench/ or $DRAGOMAN_BENCH_HOME) first. Writes $(BENCH_OUT).
BENCH_OUT ?= docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python -m bench --out $(BENCH_OUT)

# Under a minute once the peers are installed: Dragoman vs BullMQ vs arq (10 ms), short closed and open
# loops; prints the figures, never asserts on speed (exit 1 only when the harness itself fails).
bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

# The fault suite (real processes under load, one fault at a time); writes docs/reliability.md and
# exits non-zero when a fault loses, duplicates or leaks anything. CI runs the short version
# (tests/e2e/test_chaos_quick.py).
chaos: $(STAMP)
	$(BIN)/python -m chaos --out docs/reliability.md

lint: $(STAMP)
	$(BIN)/ruff check src tests bench chaos

clean:
	rm -rf $(VENV) .pytest_cache artifacts
