# Two entry points for a fresh machine (see README):
#   make demo  — set up .venv and run `safetylab reproduce --scale quick`
#   make test  — set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the constraints file keeps every later resolve on this build.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/safetylab reproduce --scale quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The CPU benchmarks; benchmarks/gpu_* need a GPU machine (README, Development).
bench: $(STAMP)
	for b in $(filter-out benchmarks/gpu_%,$(wildcard benchmarks/*.py)); do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
