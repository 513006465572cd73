# tandem: `make test` sets up a fresh machine (venv, torch, build) and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1
JOBS   ?= $(shell nproc)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tandem
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: test build demo clean

test: $(STAMP)/core
	$(PY) -m pytest -q

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
	$(PY) -m pip install -q "$(TORCH)" numpy tqdm matplotlib pytest pytest-timeout ninja "setuptools>=77" wheel \
		safetensors==0.8.0 tokenizers==0.23.3 transformers==5.23.0
	mkdir -p $(STAMP) && touch $@

# First time: an editable install (builds the core); then incremental rebuilds of the core
# after C++/CUDA edits (ninja, build/).
$(STAMP)/core: $(STAMP)/venv setup.py pyproject.toml buildtools/locate.py $(CSRC)
	if [ -f $(STAMP)/installed ]; then \
		MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace; \
	else \
		MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(STAMP)/installed; \
	fi
	touch $@

clean:
	rm -rf build python/tandem/_C*.so $(STAMP)
