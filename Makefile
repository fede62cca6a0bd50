# The two commands that matter: `make demo` (the main job on the embedded default model) and
# `make test` (every test). Both bring the environment up first; that step is a no-op when current.
VENV := .venv/bin
DEMO_SPECS ?= gguf:q8_0,gguf:q4_k_m,gguf:q3_k_m,gguf:q2_k
DEMO_OUT ?= out/demo

.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/edgequant inspect
	$(VENV)/edgequant convert --to $(DEMO_SPECS) -o $(DEMO_OUT)
	@for spec in $$(echo $(DEMO_SPECS) | tr ',' ' '); do \
		slug=$$(echo $$spec | tr ':' '-'); \
		$(VENV)/edgequant eval $(DEMO_OUT)/$$slug || exit 1; \
	done

test: setup
	$(VENV)/python -m pytest -q

test-fast: setup
	$(VENV)/python -m pytest -q -m "not slow"

bench: setup
	$(VENV)/python bench/gguf_pipeline.py
