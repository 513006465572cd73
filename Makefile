# tandem: `make test` sets up a fresh machine (venv, torch, build) and runs the tests: pytest,
# then the C++ tests under AddressSanitizer + UBSan (ctest, CMake preset asan).
# `make tsan` runs the C++ tests under ThreadSanitizer (CMake preset tsan).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1
JOBS   ?= $(shell nproc)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tandem
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

CMAKE_PY := -DPython3_EXECUTABLE=$(abspath $(PY))

.PHONY: test build demo clean asan tsan

# pytest on every core (pytest-xdist, a test file per worker: their module fixtures stay
# shared), then the C++ tests.
test: $(STAMP)/core
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile
	$(MAKE) asan

# C++ tests of the CPU-only core (no Python), instrumented; a sanitizer report fails them.
asan tsan: $(STAMP)/venv $(STAMP)/cpp-deps
	mkdir -p build && cmake --preset $@ $(CMAKE_PY) > build/$@-configure.log 2>&1 || (cat build/$@-configure.log; exit 1)
	cmake --build --preset $@ -j $(JOBS)
	ctest --preset $@ -j $(JOBS)

build: $(STAMP)/core

# The main job: a byte-level Llama-class model learns the repository's own docs and sources at
# tp=2 x pp=2 (4 CPU processes, gloo, 1F1B), reports its validation loss against the text's
# unigram entropy, then writes a few lines.
DEMO ?= runs/demo
demo: $(STAMP)/core
	$(PY) -m tandem prepare-data README.md docs python --out $(DEMO)/data
	$(PY) -m tandem train --tp 2 --pp 2 --schedule 1f1b --model byte-llama --data $(DEMO)/data/train.bin \
		--val-data $(DEMO)/data/val.bin --eval-every 50 --steps 300 --batch-size 8 --warmup-steps 20 \
		--out $(DEMO) --log-every 25
	$(PY) -m tandem generate --checkpoint $(DEMO)/checkpoint --tp 2 --pp 2 --prompt "def " \
		--max-new-tokens 200 --temperature 0.8 --top-k 40

# A CUDA build of torch, so the CUDA sources compile here even without a GPU.
$(STAMP)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy tqdm matplotlib pytest pytest-timeout pytest-xdist ninja "setuptools>=77" wheel \
		safetensors==0.8.0 tokenizers==0.23.3 transformers==5.23.0
	mkdir -p $(STAMP) && touch $@

# First time: an editable install (builds the core); then incremental rebuilds of the core
# after C++/CUDA edits (ninja, build/).
$(STAMP)/core: $(STAMP)/venv setup.py pyproject.toml buildtools/locate.py buildtools/plan.py $(CSRC)
	if [ -f $(STAMP)/installed ]; then \
		MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace; \
	else \
		MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(STAMP)/installed; \
	fi
	touch $@

# GoogleTest, and gloo's headers (the torch wheel lacks them; the C++ tests build gloo groups),
# from the system packages (CI runs as root on a fresh machine).
$(STAMP)/cpp-deps:
	if ! [ -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake -a -f /usr/include/gloo/rendezvous/store.h ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libgtest-dev libgloo-dev; \
		else echo "GoogleTest or gloo headers missing: sudo apt-get install libgtest-dev libgloo-dev"; exit 1; fi; \
	fi
	mkdir -p $(STAMP) && touch $@

clean:
	rm -rf build python/tandem/_C*.so $(STAMP)
