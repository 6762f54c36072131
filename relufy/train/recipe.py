"""Training recipes: one YAML file says everything about a run; pydantic validates it.

``relufy train RECIPE.yaml key=value ...`` applies dotted overrides (values parsed as YAML:
``optim.lr=1e-4``, ``budget.max_steps=200``, ``sparsity.distill.weight=0.5``) before validation.
Every field's description below is its documentation.

A recipe file is a UTF-8 YAML mapping; every number in it (``model.config`` included) must be
finite: ``.inf`` and ``.nan`` are refused, so that nothing non-finite reaches the run or the
JSON it writes. Values are taken as written: an integer field refuses ``true`` and ``2.5``, a
switch refuses ``1``, a number refuses ``true`` (numbers written ``1e-4``, a string to YAML 1.1,
are read as numbers). The file and each override's value are read within bounds
(``relufy.train.recipe_yaml``: no duplicate keys, aliases expanding to at most 100,000 values,
64 levels of nesting, integers of at most 40 digits); ``validate`` applies the same bounds to any
dict, and integers beyond +-(2^63 - 1) are refused. ``name`` is a label (letters, digits, ``.``,
``_``, ``-``): it names a folder and goes into the logs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from ..errors import RelufyError
from ..io.hub import PushOptions
from ..options import first_error, option_field
from . import recipe_yaml


def _not_a_boolean(value):
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


# A recipe's numbers and switches are taken as written: true is not 1, 1 is not true, 2.5 is not 2.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
# floats also accept integers and YAML 1.1's `1e-4` (a string to YAML, a number to everyone else)
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Beta = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0, lt=1)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSpec(_Spec):
    path: str | None = Field(None, description="A relufy checkpoint, or an original model (folder, .gguf, hub id).")
    config: dict | None = Field(
        None, description="Instead of `path`: a transformers config dict (with `model_type`) to train from scratch."
    )
    tokenizer: str | None = Field(None, description="Tokenizer source (a model folder); default: model.path.")
    activation: str | None = Field(
        None, description="Activation to swap in memory (drelu, reglu, relu2, fatrelu, swiglu); default: the checkpoint's."
    )
    threshold: Float | None = Field(None, description="FATReLU threshold (fatrelu only).")
    gradient_checkpointing: Bool = Field(False, description="Recompute activations in backward to save memory.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path and model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is needed when training from model.config")
        if self.threshold is not None and self.activation is None:
            raise ValueError(
                "model.threshold needs model.activation: fatrelu (without it the checkpoint's own activation and "
                "threshold apply, and this threshold would be ignored)"
            )
        if self.activation is not None:
            from ..modeling.spec import ActivationSpec

            try:
                ActivationSpec(activation=self.activation, threshold=self.threshold)
            except ValidationError as e:
                message = e.errors()[0]["msg"].removeprefix("Value error, ").replace("--threshold", "model.threshold")
                raise ValueError(message) from None
        return self


class _TextSpec(_Spec):
    data: str = Field(
        description="A local .txt file (one text), .jsonl (one record per line) or .parquet file; builtin:pydoc; or a "
        "dataset read with `datasets.load_dataset`: a hub id NAME[:CONFIG][:SPLIT] (e.g. "
        "`HuggingFaceFW/fineweb-edu:sample-10BT:train`), a local dataset folder, or a packaged builder (json, parquet, "
        "csv, text) with data_files (see relufy.text)."
    )
    text_column: str = Field(
        "text",
        min_length=1,
        description="The column (a .jsonl record's field) holding the text, e.g. `content` for bigcode/starcoderdata.",
    )
    split: str | None = Field(
        None,
        min_length=1,
        description="Datasets only: the split to read; default: the SPLIT of NAME:CONFIG:SPLIT, else `train`. A split "
        "here and a different one in `data` are refused.",
    )
    data_dir: str | None = Field(
        None,
        min_length=1,
        description="Datasets only: `load_dataset`'s data_dir, the dataset's folder to read (starcoderdata: `python`).",
    )
    data_files: str | list[str] | None = Field(
        None,
        description="Datasets only: `load_dataset`'s data_files: file names or glob patterns within the dataset (or "
        "local files, for a packaged builder such as `json`).",
    )
    revision: str | None = Field(
        None, min_length=1, description="Hub datasets only: the branch, tag or commit to read (`load_dataset`'s revision)."
    )
    streaming: Bool | None = Field(
        None,
        description="Read records lazily with `datasets` streaming (resumable; local .txt files stream by lines). "
        "null (auto): datasets read by name or folder (hub ids, dataset folders, packaged builders) stream, local "
        "files and builtin:pydoc are read into memory; true/false force it. Held out: the first "
        "data.heldout_sequences packed sequences of the whole stream (the same on every process), whose records are "
        "left out of training. Under several processes each reads only its share of the stream "
        "(`datasets.distributed.split_dataset_by_node`: whole shards when their number divides by the process count, "
        "else every n-th record), and a resume needs the same process count.",
    )

    @model_validator(mode="after")
    def _split_once(self):
        parts = self.data.split(":")
        if self.split is not None and len(parts) == 3 and parts[2] and not self.data.startswith((".", "/", "~")):
            if parts[2] != self.split:
                raise ValueError(
                    f"split {self.split!r} disagrees with the split {parts[2]!r} in data {self.data!r}; give it once"
                )
        return self


class SourceSpec(_TextSpec):
    weight: Float = Field(1.0, gt=0, description="Mixture weight: share of training sequences drawn from this source.")


class EvalSourceSpec(_TextSpec):
    name: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The label in metrics.jsonl, summary.json and the logs (letters, digits, _ . -); default: the "
        "file's stem, or the text after the last ':' or '/' of `data`.",
    )
    max_tokens: Int = Field(
        16384,
        ge=8,
        description="Tokens scored: the first max_tokens // data.seq_len packed sequences of the source (at least one).",
    )

    @property
    def label(self) -> str:
        """``name``, else one derived from ``data``: ``pydoc`` for builtin:pydoc, a file's stem
        (``wiki.valid``), a dataset's NAME:CONFIG:SPLIT with ``-`` for ``:`` and ``/``."""
        if self.name:
            return self.name
        data = self.data.rstrip("/")
        suffixes = (".txt", ".jsonl", ".json", ".parquet", ".raw")
        if data.startswith("builtin:"):
            label = data.split(":", 1)[1]
        elif data.lower().endswith(suffixes) or data.startswith((".", "/", "~")):
            label = Path(data).name
            for suffix in suffixes:
                if label.lower().endswith(suffix) and len(label) > len(suffix):
                    label = label[: -len(suffix)]
                    break
        else:
            label = data
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "eval"


def _same_text(a: str, b: str) -> bool:
    """Whether two `data` strings name the same text: equal, or the same local file or folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


class DataSpec(_Spec):
    sources: list[SourceSpec] = Field(min_length=1, description="Weighted mixture of text sources.")
    eval_sources: list[EvalSourceSpec] = Field(
        [],
        description="Held-out text from outside the training mixture (another corpus, or another split), each scored "
        "on its own beside the in-domain held-out slice: perplexity and FFN zeros before training, at every "
        "held-out evaluation (log.eval_every, log.eval_steps) and after, in metrics.jsonl (`eval`), summary.json "
        "(`eval`, with the teacher's perplexity and the ratio when there is a teacher) and the log lines. A source "
        "that is also a training source is refused: judge recovery on text the training never saw.",
    )
    seq_len: Int = Field(512, ge=8, description="Tokens per packed training sequence.")
    heldout_fraction: Float = Field(
        0.05, ge=0, lt=0.5, description="In-memory sources: the last fraction of each source's sequences held out for eval."
    )
    heldout_sequences: Int = Field(
        16, ge=0, description="Streaming sources: the first packed sequences of each stream held out for eval."
    )
    num_proc: Int = Field(
        1, ge=1, description="Processes tokenizing each in-memory source (`datasets.map`'s num_proc; 1: in this process)."
    )
    chat: Bool = Field(False, description="SFT: sources are .jsonl with `messages`; loss on assistant tokens only.")

    @model_validator(mode="after")
    def _outside(self):
        labels = [e.label for e in self.eval_sources]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"eval_sources: two sources are labelled {label!r}; give each a distinct name")
        for e in self.eval_sources:
            for s in self.sources:
                same = _same_text(e.data, s.data) and (e.split, e.data_dir, e.data_files) == (s.split, s.data_dir, s.data_files)
                if same:
                    raise ValueError(
                        f"eval_sources: {e.data} is also a training source; eval_sources hold text outside the "
                        "training mixture (its in-domain held-out slice is scored anyway)"
                    )
        return self


class OptimSpec(_Spec):
    lr: Float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    min_lr: Float = Field(5e-6, ge=0, description="Floor the cosine schedule decays to.")
    warmup_steps: Int = Field(1000, ge=0, description="Linear warmup steps from 0 to lr.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay.")
    eps: Float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: Float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (null: off).")

    @model_validator(mode="after")
    def _floor(self):
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) is above optim.lr ({self.lr})")
        return self


class BudgetSpec(_Spec):
    max_steps: Int | None = Field(None, ge=1, description="Optimizer steps to run.")
    max_tokens: Int | None = Field(None, ge=1, description="Or: training tokens to consume (sets the step count).")
    micro_batch_size: Int = Field(1, ge=1, description="Sequences per forward pass, per process.")
    grad_accum: Int = Field(1, ge=1, description="Micro-batches per optimizer step.")

    @model_validator(mode="after")
    def _one(self):
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of budget.max_steps and budget.max_tokens")
        return self


class DistillSpec(_Spec):
    teacher: str | None = Field(None, description="Teacher model; default: model.path with its original activation.")
    weight: Float = Field(1.0, ge=0, description="Weight of the KL term added to the LM loss.")
    temperature: Float = Field(1.0, gt=0, description="Softmax temperature of teacher and student.")
    teacher_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="The frozen teacher's weights (and so its forward): auto is bf16 when the run is sharded (FSDP2: "
        "each process reads the teacher in bf16, keeps only its shard on its device and drops the rest; no fp32 "
        "copy) and fp32 otherwise. The FFN warm start reads the same teacher (fp32 when there is no distillation).",
    )
    hidden_weight: Float = Field(
        0.0,
        ge=0,
        description="Also distil hidden states: this weight times the mean over decoder layers of the relative "
        "squared error ||h_student - h_teacher||^2 / ||h_teacher||^2 of each layer's output (both models run with "
        "output_hidden_states). 0: logits only.",
    )
    top_k: Int | None = Field(
        None,
        ge=1,
        description="Distil on the teacher's k most likely tokens plus one tail bucket (the rest of either model's "
        "probability) instead of the full vocabulary: the teacher's logits are cut to k per token right after its "
        "forward, and no vocabulary-wide teacher log-probabilities or KL terms are kept; null: full vocabulary.",
    )


class WarmstartSpec(_Spec):
    tokens: Int = Field(16384, ge=64, description="Training tokens whose hidden states the FFN fits use.")
    steps: Int = Field(200, ge=1, description="Adam steps per layer.")
    lr: Float = Field(1e-3, gt=0, description="Adam learning rate of the per-layer fit.")
    l1: Float = Field(
        0.0, ge=0, description="L1 penalty on each FFN's combined activation during the fit (holds sparsity); 0: off."
    )
    block: Int | list[Int] = Field(
        1,
        description="Decoder layers fitted together. 1: each FFN alone, on the original FFN's recorded inputs and "
        "outputs. K > 1: each run of K consecutive layers (the last run may be shorter) starts from the original "
        "model's hidden state at its first layer, and its FFNs are fitted so that its last layer's output matches the "
        "original's (squared error on the residual stream; attention and routers are not trained), so the errors that "
        "compound from layer to layer inside a block are fitted as well. `steps` are then Adam steps per block, each "
        "on whole sequences. A list fits in stages, one after the other on the same tokens, each with `steps`, `lr` "
        "and `l1`: [1, 5] fits each FFN alone, then blocks of 5 layers from there.",
    )

    @model_validator(mode="after")
    def _blocks(self):
        stages = self.stages
        if not stages or any(k < 1 for k in stages):
            raise ValueError("block: a layer count >= 1, or a non-empty list of them")
        return self

    @property
    def stages(self) -> list[int]:
        """The block sizes fitted one after the other (one stage for a single ``block``)."""
        return list(self.block) if isinstance(self.block, list) else [self.block]


class CutoffSpec(_Spec):
    sparsity: Float = Field(
        gt=0, lt=1, description="Fraction of each FFN's combined activations at or below its cutoff (zeros included)."
    )
    tokens: Int = Field(8192, ge=64, description="Training tokens, drawn after the last step, that calibrate the cutoffs.")


class SparsitySpec(_Spec):
    l1: Float = Field(0.0, ge=0, description="L1 penalty on the FFN's combined activation (ProSparse); 0: off.")
    l1_warmup_steps: Int = Field(
        0,
        ge=0,
        description="linear: ramp the L1 coefficient linearly from 0 over these steps. sine-stages: the length of "
        "each stage's sine rise (0: half a stage).",
    )
    l1_schedule: Literal["linear", "sine-stages"] = Field(
        "linear",
        description="How the L1 coefficient reaches `l1`. linear: a ramp over l1_warmup_steps, then constant. "
        "sine-stages (ProSparse's progressive regularization): the run is split into l1_stages equal stages; stage k "
        "(1..S) raises the coefficient from its level in stage k-1 (0 before the first) to l1 x k / S along a "
        "quarter sine over l1_warmup_steps steps, then holds it.",
    )
    l1_stages: Int = Field(1, ge=1, description="sine-stages: the number of stages.")
    anneal_steps: Int = Field(
        0,
        ge=0,
        description="Anneal the activation instead of a hard swap: over the first N steps each FFN computes "
        "(1 - a) x the model's original gated activation + a x its relufy activation, a rising linearly from 0 to "
        "1 (then exactly the relufy activation). 0: off.",
    )
    distill: DistillSpec | None = Field(None, description="KL distillation from the original SwiGLU model.")
    ffn_warmstart: WarmstartSpec | None = Field(
        None, description="Before training, fit each FFN to the original FFN's outputs, layer by layer."
    )
    router_aux_coef: Float | None = Field(None, ge=0, description="MoE router auxiliary loss (Turbo Sparse: 0.02).")
    final_cutoff: CutoffSpec | None = Field(
        None,
        description="ProSparse's final FATReLU shift, on the combined activation act(gate) * up: after the last step "
        "each FFN gets the magnitude cutoff under which `sparsity` of its activations lie on `tokens` training tokens "
        "(one per FFN module; the experts of an experts module share one), and entries below it become zero. The "
        "final model applies them (config.json relufy.cutoffs, read by its modeling code, relufy and the sparse "
        "engine); the final evals are taken with them, and summary.json's `cutoff` keeps the figures without.",
    )


class LoraSpec(_Spec):
    r: Int = Field(16, ge=1, description="LoRA rank.")
    alpha: Float = Field(32, gt=0, description="LoRA alpha.")
    dropout: Float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear modules to adapt (names or name suffixes, e.g. q_proj); each must name a module of the "
        "model. [] only with target_parameters (peft would otherwise adapt its own default modules).",
    )
    target_parameters: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="Parameters to adapt directly, e.g. fused MoE experts: ['experts.gate_up_proj', 'experts.down_proj']."
    )

    @model_validator(mode="after")
    def _something_to_adapt(self):
        if not self.target_modules and not self.target_parameters:
            raise ValueError(
                "target_modules is empty and so is target_parameters: nothing to adapt (peft would silently adapt its "
                "default modules instead); name the modules, e.g. [q_proj, v_proj]"
            )
        return self


class LogSpec(_Spec):
    every: Int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: Int = Field(0, ge=0, description="Held-out perplexity every N steps (0: only at the end).")
    eval_steps: list[Int] = Field(
        [],
        description="Also evaluate after exactly these steps (e.g. log-spaced, 5, 10, 20, 40, ... for a budget "
        "curve of perplexity and zeros against training tokens); each such step is logged too. Steps past the "
        "run's end are left out (a shortened run keeps the recipe's list).",
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        [],
        description="Also log the metrics through Accelerate's trackers: tensorboard (event files in OUTPUT_DIR/<name>; "
        "pip install 'relufy[tensorboard]') and/or wandb (the recipe as the run's config; pip install 'relufy[wandb]', "
        "then `wandb login`, or WANDB_MODE=offline). Main process only.",
    )
    sparsity: Bool = Field(True, description="Count zeros of the FFN activations (per layer) for the logs.")


class CheckpointSpec(_Spec):
    every: Int = Field(0, ge=0, description="Save the full training state every N steps (0: off).")
    keep_last: Int = Field(2, ge=1, description="Keep the newest K training-state checkpoints.")


class Recipe(_Spec):
    name: str = Field(
        description="Run name: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 "
        "characters (it names the run in the logs and its tracker folder OUTPUT_DIR/<name>)."
    )
    output_dir: str = Field(description="Where checkpoints, metrics.jsonl, plots and the final model go.")
    seed: Int = Field(0, ge=0, le=2**32 - 1, description="Seed for initialization, data order and dropout.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (mixed precision) or fp32.")
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    budget: BudgetSpec
    sparsity: SparsitySpec = SparsitySpec()
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters (merged into the final model) instead of all weights.")
    log: LogSpec = LogSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(
                f"{recipe_yaml.short(ascii(name))} is not a run name: use letters, digits, '.', '_' and '-', starting "
                "with a letter or digit, at most 100 characters (it names a folder and goes into the logs)"
            )
        return name


class TrainOptions(PushOptions):
    """How ``relufy train`` starts."""

    resume: bool = option_field(False, description="Continue from the newest intact checkpoint in output_dir.")
    dry_run: bool = option_field(
        False,
        description="Check the recipe and its paths, print it resolved and its memory plan (relufy.train.memory; "
        "refused if it does not fit); train nothing.",
    )
    gpus: int | None = option_field(
        None,
        ge=1,
        description="With --dry-run: plan the memory of each GPU of a run on N GPUs per node; without it the plan "
        "is for this machine's CPU.",
    )
    nodes: int = option_field(1, ge=1, description="With --gpus: nodes of --gpus GPUs each (FSDP2 shards over all).")
    gpu_memory: str = option_field(
        "80GB", description="With --gpus: the memory of one GPU (GB: 10^9 bytes, GiB: 2^30; e.g. 80GB, 141GiB)."
    )
    strategy: Literal["fsdp2", "ddp"] | None = option_field(
        None,
        description="With --dry-run: how the planned processes hold the model: fsdp2 shards it, ddp keeps a full "
        "copy in each; default: fsdp2 for several GPUs, ddp for several CPU processes.",
    )
    processes: int | None = option_field(
        None,
        ge=1,
        description="With --dry-run and no --gpus: plan N CPU processes (torchrun --nproc_per_node N); default: "
        "the launch's WORLD_SIZE, or 1.",
    )
    export_step: int | None = option_field(
        None,
        ge=1,
        description="Train nothing: write the run's checkpoint of this step as a model folder (relufy convert's format, "
        "LoRA merged) to OUTPUT_DIR/exports/step-N, to evaluate a run mid-way; runs with one process.",
    )

    @model_validator(mode="after")
    def _plan_flags(self):
        from .memory import parse_size

        try:
            parse_size(self.gpu_memory)
        except ValueError as e:
            raise ValueError(f"--gpu-memory: {e}") from None
        flags = (("--gpus", self.gpus), ("--processes", self.processes), ("--strategy", self.strategy))
        given = [flag for flag, value in flags if value is not None]
        if given and not self.dry_run:
            raise ValueError(f"{given[0]} plans memory: it goes with --dry-run")
        if self.nodes > 1 and self.gpus is None:
            raise ValueError("--nodes goes with --gpus (GPUs per node)")
        if self.gpus is not None and self.processes is not None:
            raise ValueError("--processes plans CPU processes; with --gpus the processes are the GPUs")
        return self


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted ``key=value`` pairs (values parsed as YAML, within ``relufy.train.recipe_yaml``'s
    bounds; keys at most ``MAX_DEPTH`` parts) in a copy of the nested dict ``raw``."""
    check_shape(raw, "recipe")
    raw = recipe_yaml.load(yaml.safe_dump(raw), "recipe") or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RelufyError(f"override {recipe_yaml.short(repr(item))} is not key=value")
        parts = key.split(".")
        if len(parts) > recipe_yaml.MAX_DEPTH:
            raise RelufyError(
                f"override {recipe_yaml.short(key)}: {len(parts):,} levels of keys; a recipe nests at most "
                f"{recipe_yaml.MAX_DEPTH}"
            )
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise RelufyError(f"override {recipe_yaml.short(repr(item))}: {recipe_yaml.short(part)} is not a section")
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = recipe_yaml.load(value, f"override {recipe_yaml.short(key)}")
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise RelufyError(f"override {recipe_yaml.short(repr(item))}: the value is not valid YAML ({first})") from None
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at ``path``, or the shipped recipe of that name (``demo-smollm2-cpu``) when no
    such path exists, with ``overrides`` applied, validated."""
    from .recipes import resolve

    path = resolve(path)
    if not path.exists():
        raise RelufyError(f"recipe {path} not found")
    from ..io.read import CONFIG_BYTES, read_bytes

    try:  # a regular file of at most 16 MiB: a pipe or a device is refused without blocking
        text = read_bytes(path, CONFIG_BYTES, "recipe").decode("utf-8")
    except UnicodeDecodeError:
        raise RelufyError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    try:
        raw = recipe_yaml.load(text, str(path))
    except yaml.YAMLError as e:
        raise RelufyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RelufyError(f"{path}: a recipe is a YAML mapping (name: ..., model: ..., data: ...), not a {_kind(raw)}")
    return validate(apply_overrides(raw, list(overrides)), str(path))


def _kind(value) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


INT_LIMIT = 2**63 - 1  # what any integer of a recipe may reach (torch's int64)


def check_shape(raw, origin: str = "recipe") -> None:
    """Refuse, with the dotted path of the first offence, a recipe dict that holds more than
    ``recipe_yaml.MAX_NODES`` values (shared containers counted at each place), nests deeper than
    ``recipe_yaml.MAX_DEPTH`` (a container holding itself does), or holds a number that is not
    finite or an integer beyond +-(2^63 - 1). Walks without recursion and stops at the bounds."""
    stack = [(raw, "", 1)]
    seen = 0
    while stack:
        value, where, depth = stack.pop()
        seen += 1
        shown = recipe_yaml.short(where or "(top level)", 120)
        if seen > recipe_yaml.MAX_NODES:
            raise RelufyError(f"{origin}: more than {recipe_yaml.MAX_NODES:,} values (aliases expanded); a recipe holds fewer")
        if depth > recipe_yaml.MAX_DEPTH:
            raise RelufyError(f"{origin}: {shown}: nested more than {recipe_yaml.MAX_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise RelufyError(f"{origin}: {shown}: must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
            bits = value.bit_length()
            digits = f"{len(str(abs(value))):,}" if bits < 14_000 else f"about {int(bits * math.log10(2)) + 1:,}"
            raise RelufyError(f"{origin}: {shown}: an integer of {digits} digits is out of range (at most 2^63 - 1)")
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        else:
            continue
        for key, item in reversed(items):  # the first offence in document order is reported
            stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))


def validate(raw: dict, origin: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RelufyError(f"{origin}: a recipe is a mapping, not a {_kind(raw)}")
    check_shape(raw, origin)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        loc, msg = first_error(e)
        err = e.errors()[0]
        if err["type"].endswith("_type") and "input" in err:  # a value of the wrong type: say what was given
            value = err["input"]
            shown = str(value).lower() if isinstance(value, bool) else recipe_yaml.short(repr(value), 40)
            msg += f", got {_kind(value)} {shown}"
        raise RelufyError(f"{origin}: {'.'.join(loc) or '(top level)'}: {msg}") from None


def dump(recipe: Recipe) -> str:
    """The recipe as YAML, every field resolved (what ``recipe.yaml`` in a run folder holds)."""
    import json

    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
