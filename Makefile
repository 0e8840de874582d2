# Two commands for a newcomer:
#   make run   — set up .venv, export SmolLM2-135M-Instruct to int4 once, answer a prompt (streaming)
#   make test  — set up .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
OPTIMUM_VENV ?= .venv-optimum
PY := $(VENV)/bin/python
PACKAGE ?= packages/smollm2-135m-int4
PROMPT ?= What is the capital of France?

.PHONY: run test setup lint bench report report-quick desktop serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: it takes the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,models,serve,desktop,bench,test]'
	# QNN HTP (NPU) plugin EP, ~100 MB; only Linux x86-64 and Windows have wheels: its tests skip without it
	$(PY) -m pip install -q -e '.[npu]' || echo "onnxruntime-qnn is not available here: the QNN tests will skip"
	# optimum (breadth fallback for families without a hand-built graph) pins transformers < 4.58: own venv
	test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q torch==2.13.0 optimum-onnx onnx onnxruntime
	# espeak-ng speaks the sentences of the Whisper end-to-end test (which skips, saying so, without it)
	command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && apt-get install -y -q espeak-ng >/dev/null 2>&1; } \
		|| echo "note: espeak-ng could not be installed: the Whisper end-to-end test will be skipped"
	touch $@

$(PACKAGE)/edgeinfer.json: | setup
	$(VENV)/bin/edgeinfer export smollm2-135m -o $(PACKAGE) --precision int4 --force

run: setup $(PACKAGE)/edgeinfer.json
	$(VENV)/bin/edgeinfer run $(PACKAGE) "$(PROMPT)" --chat

test: setup
	$(VENV)/bin/ruff check edgeinfer export models runtimes apps tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check edgeinfer export models runtimes apps tests

bench: setup $(PACKAGE)/edgeinfer.json
	$(VENV)/bin/edgeinfer bench $(PACKAGE)

# The whole benchmark report against the peers (installed in their own venvs), ~30 min on 2 cores:
# docs/benchmarks.md and the pages it links. report-quick: a few minutes, build/bench/quick/ only.
report: setup
	HF_HUB_OFFLINE=1 $(PY) apps/bench/report.py

report-quick: setup
	HF_HUB_OFFLINE=1 $(PY) apps/bench/report.py --quick

desktop: setup $(PACKAGE)/edgeinfer.json
	$(PY) apps/desktop/chat_app.py $(PACKAGE)

serve: setup $(PACKAGE)/edgeinfer.json
	$(VENV)/bin/edgeinfer serve $(PACKAGE)

clean:
	rm -rf packages build .pytest_cache
