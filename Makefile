# Two entry points for a fresh machine (see README):
#   make demo  — set up .venv and run `safetylab reproduce --scale quick`
#   make test  — set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the constraints file keeps every later resolve on this build.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# nanoGCG, the reference GCG the tests compare against, pins transformers<=4.47.1 but runs
	# with ours (safetylab.attacks.reference): installed without its dependencies.
	$(BIN)/python -m pip install --quiet --no-deps nanogcg==0.3.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/safetylab reproduce --scale quick

# tests/test_browser.py opens reports in headless Chromium: Debian's package, installed
# where we may (root with apt-get); elsewhere that test skips, except under CI=true.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

# Two workers, a test file to each in turn (module fixtures stay in one process); the
# tiny organisms are trained once for both (tests/conftest.py).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The CPU benchmarks; benchmarks/gpu_* need a GPU machine (README, Development).
bench: $(STAMP)
	for b in $(filter-out benchmarks/gpu_%,$(wildcard benchmarks/*.py)); do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
