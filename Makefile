# `make demo` runs the main job on the CPU; `make test` runs the tests; `make test-gguf` the llama.cpp checks;
# `make notebook` re-executes notebooks/inference.ipynb against the demo's run. All set up .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED := $(abspath ../shared/data)

# Offline defaults: the sample data and GPT-2 BPE file beside the checkout, when present.
ifneq ($(wildcard $(SHARED)/gpt2.tiktoken),)
export TINYGEMMA_GPT2_BPE ?= $(SHARED)/gpt2.tiktoken
endif
ifneq ($(wildcard $(SHARED)/tinystories),)
export TINYSTORIES_DIR ?= $(SHARED)/tinystories
endif

.PHONY: setup browser test test-gguf lint demo demo-instruct notebook clean

setup: $(VENV)/.installed

# The studio's browser test drives Debian's headless Chromium; install it when missing (needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: chromium/chromedriver missing and not root: the browser test will fail"

# torch is pinned and installed first so that nothing later pulls a multi-GB CUDA build here.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: setup browser lint
	$(PY) -m pytest -q -m "not llamacpp"

# llama-cpp-python compiles llama.cpp from source (12+ minutes on 2 cores): the wheel is built once into
# WHEELS and installed from there afterwards.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/tinygemma-wheels

test-gguf: setup
	@$(PY) -c 'import llama_cpp' 2>/dev/null || { \
	  { ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip wheel -q --no-deps -w $(WHEELS) $(LLAMA_CPP); } && \
	  $(PY) -m pip install -q --find-links $(WHEELS) $(LLAMA_CPP); }
	$(PY) -m pytest -q -m llamacpp

demo: setup
	bash scripts/demo.sh

# Fine-tunes runs/demo on derived instructions -> runs/demo-instruct (the notebook's section 9); after make demo.
demo-instruct: setup
	bash scripts/demo_instruct.sh

# Saves the notebook with the outputs of runs/demo (the paths in them relative to notebooks/).
notebook: setup
	@test -d runs/demo || { echo "make notebook: no runs/demo; run make demo first"; exit 2; }
	$(PY) scripts/notebook.py notebooks/inference.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
