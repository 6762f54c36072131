"""Memory plan of a training recipe, before booking GPUs (``relufy train RECIPE --dry-run``).

``relufy train RECIPE --dry-run --gpus N [--nodes M] [--gpu-memory 80GB] [--strategy fsdp2|ddp]``
prints what one GPU holds; without ``--gpus`` the plan is for this machine's CPU (``--processes
N``, default: the launch's ``WORLD_SIZE`` or 1): each process's peak resident memory (RSS). A plan
that does not fit is refused on one line naming what to change. The model's sizes come from its
``config.json`` alone (``relufy.modeling.spec.base_config``: no weights are read; a hub model's
config is the only file fetched).

**Parameters** (``model_sizes``; counted from the config per family of ``relufy.families`` and
checked against ``sum(p.numel())`` of real models in tests/train/test_memory.py):
embedding ``V H``; attention per layer ``H (q + 2 kv) + q H`` with ``q = heads x head_dim``,
``kv = kv_heads x head_dim`` (Phi-3 fused, DeepSeek-V3's MLA with its low-rank projections and
norms) plus the family's biases (``attention_bias``, Qwen2's q/k/v) and q/k norms (Qwen3,
Gemma 3, OLMoE); FFN per dense layer ``3 H I`` (Llama's ``mlp_bias`` adds ``2 I + H``); per MoE
layer the router ``E H``, routed experts ``E 3 H I_moe`` and shared experts (Qwen2-MoE:
``3 H I_shared + H`` with its gate; DeepSeek-V3: ``3 H I_moe n_shared``), with dense layers where
the config says (``first_k_dense_replace``, ``mlp_only_layers``, ``decoder_sparse_step``); norms
``H`` each (2 per layer, Gemma 2/3: 4) plus the final norm; the LM head ``V H`` unless tied.

**Terms per GPU** (bytes; ``P`` parameters, ``P_t`` trainable ones: all of them, or with LoRA
only the adapters, ``r (fan_in + fan_out)`` per targeted linear and ``r E (d1 + d2)`` per
targeted expert tensor; ``W`` processes sharing the model; ``B`` micro-batch, ``S`` seq_len,
``T = B S`` tokens, ``V`` vocabulary, ``L`` layers, ``H`` hidden size):

- weights ``4 P`` (fp32 master weights: ``precision: bf16`` is autocast through Accelerate's
  mixed precision, so the weights, gradients and optimizer states stay fp32; relufy loads the
  student in fp32); gradients ``4 P_t``; optimizer ``8 P_t`` (AdamW's two fp32 moments) and,
  during ``optimizer.step``, one fp32 temporary of ``4 P_t`` (the foreach implementation's
  ``sqrt(v)``), which does not coincide with the activations;
- FSDP2 (the default for more than one GPU): weights, gradients, optimizer and teacher divided by
  ``W``, plus in flight the all-gathered unsharded parameters of two units (the largest decoder
  layer or the root: embedding, final norm and LM head; the current one and the prefetched next)
  and one unit's unsharded gradients, in the compute dtype (bf16 under ``precision: bf16``, as
  Accelerate's FSDP2 mixed-precision policy gathers and reduces); the teacher adds two of its
  own units. DDP keeps full copies on every GPU, plus its gradient buckets (``4 P_t``);
- under ``precision: bf16`` without FSDP2, autocast keeps a bf16 copy of every linear's weight
  for the forward and backward (``2 P_linear``);
- the teacher (distillation; the FFN warm start also reads it): ``P_teacher`` in
  ``sparsity.distill.teacher_dtype``: auto is bf16 when sharded (FSDP2), fp32 otherwise (and fp32
  when only the warm start reads it); it stays only when distilling;
- activations of one micro-batch, saved for the backward (counted on SmolLM2 with
  ``torch.autograd.graph.saved_tensors_hooks``: the formula gives the saved bytes within 1% in
  fp32 and 4% under bf16). Per token and layer: two RMSNorms ``2 (3 H + 1)`` fp32 (their input,
  normalised input and output; under bf16 each also a bf16 copy ``H`` of its output for the next
  linears), attention ``q + 2 kv + q + heads`` (q, k, v, SDPA's output and log-sum-exp: no
  ``S x S`` scores with SDPA/flash attention), q/k norms where the family has them, and the FFN's
  ``3 I`` for dReLU/ReGLU/FATReLU (``4 I`` SwiGLU/ReLU^2); an MoE layer ``k (2 H + 3 I_moe) + 2 E``
  (the top-k experts' gathered inputs, activations and outputs, the router's logits) plus its
  shared experts. Linear outputs are bf16 under ``precision: bf16``. With gradient checkpointing
  (``model.gradient_checkpointing``) only each layer's input ``4 H`` per token stays, and the
  backward recomputes one layer at a time: ``L 4 H T`` plus one layer's activations. The plan
  prints both figures and says which one the recipe uses;
- logits, in units of ``T V`` fp32 (4 bytes), measured at the peak of forward + backward of the
  loss section: the LM loss ``3`` (logits, the loss's log-softmax, the logits' gradient; ``+0.5``
  for the bf16 logits under bf16); distillation over the full vocabulary ``+5`` (the teacher's
  logits, both log-softmaxes, the KL's two intermediates); with ``sparsity.distill.top_k`` the
  teacher's part is ``+2`` (its logits and one fp32 temporary while they are cut to k: measured
  5.2 units in all vs 8.2 for the full vocabulary);
- the FFN warm start (``sparsity.ffn_warmstart``), a phase of its own before training (no
  gradients, no optimizer yet): the teacher, the recordings ``2 x tokens x H x ceil(L / W)`` in
  the teacher's dtype (tokens: whole ``seq_len`` sequences) and one layer's fp32 copy while it is
  fitted ``2 x tokens x H x 4``; on a GPU one layer's FFN in fp32 at a time (each goes back to the
  CPU after its fit and its broadcast), on the CPU the whole student. With ``block`` K > 1 the
  recordings are per block (``ceil(ceil(L / K) / W)``), a GPU holds one block's K whole layers, and
  a fit step adds its FFNs' gradients and two Adam moments (fp32) and the activations of one batch
  of sequences (1,024 tokens) through K layers;
- a GPU's CUDA context, cuBLAS workspace and NCCL buffers: 1 GiB.

What the run decides (the teacher's dtype and whether it stays, gradient checkpointing, mixed
precision, the warm start's sequences and fit batch, the student's activation, where the teacher
loads from) comes from ``relufy.train.decisions``, the functions ``relufy.train.loop`` calls.

The peak of training is the resident terms (weights, optimizer, teacher, buckets; gradients too
with ``grad_accum`` > 1, whose first micro-batches' gradients are held through the next forward
and backward) plus the larger of the forward/backward terms (activations, logits, in-flight units,
autocast copies) and the optimizer step's (the temporary; with ``grad_accum`` 1 also the gradients,
which then replace the activations as the backward frees them). The plan's total is the larger of
that peak and the warm start's; it fits when the total is at most the GPU's memory
(``--gpu-memory``: ``GB`` is 10^9 bytes, ``GiB`` 2^30; a bare number is GB; an "80GB" card thus
plans with 74.5 GiB, on the safe side of the 79.6-80 GiB such cards have).

**CPU** (no ``--gpus``): the same terms per process (DDP: ``ACCELERATE_USE_CPU=true torchrun
--nproc_per_node N -m relufy train ...``; ``--strategy fsdp2`` plans the FSDP2 CPU harness of the
tests, with fp32 or bf16 all-gathers as on a GPU), without the CUDA context, plus

- the process's baseline (Python, torch, transformers, Accelerate, tokenizer and data:
  ``CPU_BASELINE``, 0.5 GiB; measured 0.45 GiB steady, 0.60 GiB at its own peak);
- what glibc keeps resident of freed memory (``CPU_RETAINED``): once a freed block has raised its
  mmap threshold (up to 32 MiB), tensors below it come from the heap, whose freed space it keeps.
  Measured on SmolLM2 (fp32, one process): the peak RSS exceeds the peak of live memory by 0.3-1.9
  GiB, and by nothing with ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: the plan's other
  terms then match the peak within 2%). The plan adds half of the step's activations (as without
  checkpointing: recomputation churns the heap as much) and logits, and half of the warm start's
  recordings: within 10% of the measured peaks of the configurations in docs/benchmarks.md.

The machine's physical memory is the limit for all processes together. Measured against real runs
in docs/benchmarks.md (``make bench-memory-plan``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace

from ..errors import RelufyError
from ..io.block import RelufyBlock
from . import decisions

GiB = 2**30
CUDA_OVERHEAD = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers per GPU
CPU_BASELINE = int(0.5 * GiB)  # Python + torch + transformers + Accelerate + tokenizer + data, per process
CPU_RETAINED = 0.5  # share of a phase's freed activations and logits (recordings) glibc keeps resident
# logits, in units of tokens x vocab x 4 bytes (measured at the loss section's forward+backward peak)
LOGITS_LM, LOGITS_LM_BF16, LOGITS_KL, LOGITS_KL_TOP_K = 3.0, 0.5, 5.0, 2.0


# ---- sizes from the config ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts per part, and the shapes the plan needs, from a config alone."""

    family: str
    hidden: int
    layers: int
    vocab: int
    heads: int
    tied: bool
    embedding: int
    attention: int
    ffn_dense: int  # dense FFN layers (all layers of a dense model, the dense layers of an MoE)
    experts: int  # routed experts
    shared_experts: int  # shared experts (with Qwen2-MoE's gate)
    router: int
    norms: int
    lm_head: int  # 0 when tied to the embedding
    largest_layer: int  # parameters of the largest decoder layer (an FSDP2 unit)
    layer_linear: int  # parameters in linear layers and expert tensors (autocast casts these)
    # activations per token, per layer summed over the layers: (fp32-kept elements, compute-dtype elements)
    act_layers: tuple[float, float] = (0.0, 0.0)
    act_largest_layer: tuple[float, float] = (0.0, 0.0)

    @property
    def ffn(self) -> int:
        return self.ffn_dense + self.experts + self.shared_experts

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.ffn + self.router + self.norms + self.lm_head

    @property
    def root(self) -> int:
        """The FSDP2 root unit: embedding, final norm, LM head."""
        return self.embedding + self.hidden + self.lm_head

    def parts(self) -> dict[str, int]:
        return {
            "embedding": self.embedding,
            "attention": self.attention,
            "FFN": self.ffn_dense,
            "experts": self.experts,
            "shared experts": self.shared_experts,
            "router": self.router,
            "norms": self.norms,
            "lm_head": self.lm_head,
        }


def lora_parameters(config, r: int, target_modules=(), target_parameters=()) -> int:
    """Adapter parameters peft adds to the model of ``config`` (a config dict) for these targets,
    counted on the meta device (no memory, no weights): ``r (fan_in + fan_out)`` per targeted linear,
    ``r E (d1 + d2)`` per targeted expert tensor, and whatever peft maps onto fused experts (for
    some families it adapts the fused ``gate_up_proj`` for ``gate_proj`` + ``up_proj`` at rank 2r)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..modeling.load import skeleton

    # [] stays []: None would make peft add its default modules (what the run does: checks.lora_config)
    lora = LoraConfig(r=r, target_modules=list(target_modules), target_parameters=list(target_parameters) or None)
    with torch.device("meta"):
        model = get_peft_model(skeleton(config), lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _get(cfg, name, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def _attention(family: str, cfg, hidden: int, heads: int, kv_heads: int, head_dim: int):
    """``(parameters in linears, other parameters, activation elements per token)`` of one attention block."""
    q, kv = heads * head_dim, kv_heads * head_dim
    if family == "deepseek_v3":
        qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        v_head, kv_rank, q_rank = cfg.v_head_dim, cfg.kv_lora_rank, _get(cfg, "q_lora_rank")
        bias = bool(_get(cfg, "attention_bias", False))
        # kv_a_proj_with_mqa, kv_b_proj, o_proj; q_proj or q_a_proj + q_b_proj
        linears = hidden * (kv_rank + cfg.qk_rope_head_dim) + kv_rank * heads * (cfg.qk_nope_head_dim + v_head)
        linears += heads * v_head * hidden
        extra = kv_rank + (kv_rank + cfg.qk_rope_head_dim + hidden if bias else 0)  # kv_a_layernorm, biases
        if q_rank:
            linears += hidden * q_rank + q_rank * heads * qk_head
            extra += q_rank + (q_rank if bias else 0)
        else:
            linears += hidden * heads * qk_head
        acts = 3 * kv_rank + 3 * heads * qk_head + 2 * heads * v_head + heads + (3 * q_rank if q_rank else 0)
        return linears, extra, acts
    if family == "phi3":
        return hidden * (q + 2 * kv) + q * hidden, 0, 2 * q + 2 * kv + heads + (q + 2 * kv)  # fused qkv_proj
    linears = hidden * (q + 2 * kv) + q * hidden  # q, k, v, o
    if family == "qwen2":
        extra = q + 2 * kv
    elif family == "qwen2_moe":
        extra = q + 2 * kv if _get(cfg, "qkv_bias", True) else 0
    elif family in ("mistral", "mixtral"):
        extra = 0
    else:
        extra = q + 2 * kv + hidden if _get(cfg, "attention_bias", False) else 0
    acts = 2 * q + 2 * kv + heads
    if family in ("qwen3", "qwen3_moe", "gemma3_text"):
        extra += 2 * head_dim
        acts += 2 * (q + kv)
    elif family == "olmoe":
        extra += hidden + (hidden // heads) * kv_heads
        acts += 2 * (q + kv)
    return linears, extra, acts


def _moe_layers(family: str, cfg, layers: int) -> list[bool]:
    if family in ("qwen2_moe", "qwen3_moe"):
        only, step = set(_get(cfg, "mlp_only_layers", []) or []), _get(cfg, "decoder_sparse_step", 1)
        experts = _get(cfg, "num_experts", 0)
        return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(layers)]
    if family == "deepseek_v3":
        return [i >= _get(cfg, "first_k_dense_replace", 0) for i in range(layers)]
    return [True] * layers


def model_sizes(config, activation: str = "drelu") -> ModelSizes:
    """Parameter counts and activation shapes of a model from its config: a config dict (a
    ``config.json``, relufy checkpoints included) or a transformers config. ``activation``: the
    student's FFN activation (its saved tensors)."""
    from ..families import family_for

    if isinstance(config, dict):
        from ..modeling.spec import base_config

        family, cfg = base_config(config)
    else:
        cfg = config
        family = family_for(getattr(cfg, "model_type", None))
    name = family.model_type
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv_heads = _get(cfg, "num_key_value_heads", heads)
    head_dim = _get(cfg, "head_dim", hidden // heads)
    tied = bool(_get(cfg, "tie_word_embeddings", False))
    attn_linear, attn_extra, attn_acts = _attention(name, cfg, hidden, heads, kv_heads, head_dim)
    attn_per_layer = attn_linear + attn_extra
    norms_per_layer = 4 if name in ("gemma2", "gemma3_text") else 2
    ffn_mult = 4 if activation in ("swiglu", "relu2") else 3  # saved tensors of the gated activation
    mlp_bias = name == "llama" and bool(_get(cfg, "mlp_bias", False))
    moe = _moe_layers(name, cfg, layers) if family.is_moe else [False] * layers
    dense_i = cfg.intermediate_size

    linear = attn_linear * layers + vocab * hidden  # weights autocast casts (the LM head's: tied or not)
    ffn_dense = experts_total = shared_total = router_total = 0
    largest = 0
    act_total = [0.0, 0.0]
    act_largest = (0.0, 0.0)
    norm_acts = norms_per_layer * (3 * hidden + 1)  # fp32 in any precision (RMSNorm upcasts)
    for is_moe in moe:
        layer_linear_acts = attn_acts  # compute-dtype elements per token
        if is_moe:
            n_exp = family.routed_experts(cfg)
            width = family.moe_ffn_size(cfg)
            k = family.top_k(cfg)
            experts = n_exp * 3 * hidden * width
            router = n_exp * hidden
            shared = 0
            shared_width = 0
            if name == "qwen2_moe":
                shared_width = cfg.shared_expert_intermediate_size
                shared = 3 * hidden * shared_width + hidden  # with its gate, a linear to 1
            elif name == "deepseek_v3":
                shared_width = width * family.shared_experts(cfg)
                shared = 3 * hidden * shared_width
            experts_total += experts
            shared_total += shared
            router_total += router
            ffn_params = experts + shared + router
            linear += experts + shared
            layer_linear_acts += k * (2 * hidden + ffn_mult * width) + 2 * n_exp + hidden + ffn_mult * shared_width
        else:
            ffn_params = 3 * hidden * dense_i + ((2 * dense_i + hidden) if mlp_bias else 0)
            ffn_dense += ffn_params
            linear += 3 * hidden * dense_i
            layer_linear_acts += ffn_mult * dense_i
        layer = attn_per_layer + ffn_params + norms_per_layer * hidden
        if layer > largest:
            largest = layer
        act_total[0] += norm_acts
        act_total[1] += layer_linear_acts
        if norm_acts + layer_linear_acts > sum(act_largest):
            act_largest = (float(norm_acts), float(layer_linear_acts))
    return ModelSizes(
        family=name,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        heads=heads,
        tied=tied,
        embedding=vocab * hidden,
        attention=attn_per_layer * layers,
        ffn_dense=ffn_dense,
        experts=experts_total,
        shared_experts=shared_total,
        router=router_total,
        norms=norms_per_layer * hidden * layers + hidden,
        lm_head=0 if tied else vocab * hidden,
        largest_layer=largest,
        layer_linear=linear,
        act_layers=(act_total[0], act_total[1]),
        act_largest_layer=act_largest,
    )


# ---- what the recipe asks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The knobs of a recipe and a launch that size memory (alternatives replace some of them)."""

    precision: str = "fp32"
    seq_len: int = 512
    micro_batch: int = 1
    grad_accum: int = 1
    checkpointing: bool = False
    lora: int | None = None  # LoRA adapter parameters (None: all weights train)
    lora_default: int = 0  # adapters of a default LoRA (r 16, every projection), for the advice
    distill: bool = False
    teacher_dtype: str | None = "auto"  # auto | fp32 | bf16 (sparsity.distill.teacher_dtype; None: no distillation)
    top_k: int | None = None
    warmstart_tokens: int | None = None  # None: no FFN warm start
    warmstart_blocks: tuple[int, ...] = (1,)  # decoder layers fitted together, per stage (sparsity.ffn_warmstart.block)
    warmstart_batch: int = decisions.WARMSTART_BATCH_TOKENS  # tokens per fit step (whole sequences for blocks)
    gpus: int | None = None  # None: this machine's CPU
    world: int = 1  # processes sharing the run (GPUs x nodes, or CPU processes)
    strategy: str = "single"  # single | ddp | fsdp2
    capacity: int = 0  # bytes per GPU, or the machine's memory for all CPU processes
    capacity_label: str = ""

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    @property
    def teacher_bytes(self) -> int:
        choice = decisions.teacher_dtype(self.teacher_dtype if self.distill else None, self.sharded)
        return 2 if choice == "bf16" else 4

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def setup_from_recipe(
    recipe, gpus=None, nodes: int = 1, gpu_memory: str | None = None, strategy=None, processes=None, lora=None, lora_default=0
) -> Setup:
    """The ``Setup`` of ``recipe`` launched on ``gpus`` x ``nodes`` GPUs, or on this machine's CPU
    in ``processes`` processes (default: ``WORLD_SIZE`` of the launch, or 1). ``lora``: the recipe's
    adapter parameters (``lora_parameters``), ``lora_default``: a default LoRA's, for the advice."""
    s = recipe.sparsity
    warm = s.ffn_warmstart
    tokens = None
    if warm is not None:
        tokens = decisions.warmstart_sequences(warm.tokens, recipe.data.seq_len) * recipe.data.seq_len
    if gpus is not None:
        world = gpus * nodes
        capacity = parse_size(gpu_memory or "80GB")
        label = f"{gpu_memory or '80GB'} = {capacity / GiB:.1f} GiB per GPU"
    else:
        world = processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
        capacity = machine_memory()
        label = "this machine's RAM" + (f", all {world} processes together" if world > 1 else "")
    if strategy is None:
        strategy = ("fsdp2" if gpus is not None else "ddp") if world > 1 else "single"
    elif strategy == "ddp" and world == 1:
        strategy = "single"
    return Setup(
        precision="bf16" if decisions.mixed_precision(recipe) == "bf16" else "fp32",
        seq_len=recipe.data.seq_len,
        micro_batch=recipe.budget.micro_batch_size,
        grad_accum=recipe.budget.grad_accum,
        checkpointing=decisions.gradient_checkpointing(recipe),
        lora=lora if recipe.lora is not None else None,
        lora_default=lora_default,
        distill=decisions.keeps_teacher(s),
        teacher_dtype=decisions.teacher_dtype_choice(s),
        top_k=s.distill.top_k if s.distill else None,
        warmstart_tokens=tokens,
        warmstart_blocks=tuple(warm.stages) if warm is not None else (1,),
        gpus=gpus,
        world=world,
        strategy=strategy,
        capacity=capacity,
        capacity_label=label,
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(tb|tib|gb|gib|g|mb|mib)?\s*$", re.IGNORECASE)
_UNITS = {"tb": 10**12, "tib": 2**40, "gb": 10**9, "g": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20}


def parse_size(text: str) -> int:
    """Bytes of a memory size such as ``80GB`` (10^9), ``141GiB`` (2^30), ``80`` (GB)."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0 or not math.isfinite(float(m.group(1))):
        raise ValueError(f"expected a memory size such as 80GB or 141GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()])


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 0


# ---- the plan -------------------------------------------------------------------------------------

# when a term is held: all along training, during forward/backward, in the optimizer step, in the warm start
RESIDENT, FORWARD, OPTIMIZER, WARMSTART = "resident", "forward/backward", "optimizer step", "warm start"


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    when: str
    note: str = ""


@dataclass
class MemoryPlan:
    setup: Setup
    sizes: ModelSizes
    teacher: ModelSizes | None
    terms: list[Term] = field(default_factory=list)
    activations_other: int = 0  # the activation term with the other gradient-checkpointing setting
    advice: list[str] = field(default_factory=list)

    def _sum(self, when: str) -> int:
        return sum(t.bytes for t in self.terms if t.when == when)

    @property
    def training_peak(self) -> int:
        return self._sum(RESIDENT) + max(self._sum(FORWARD), self._sum(OPTIMIZER))

    @property
    def warmstart_peak(self) -> int:
        return self._sum(WARMSTART)

    @property
    def per_process(self) -> int:
        return max(self.training_peak, self.warmstart_peak)

    @property
    def total(self) -> int:
        """What is held against the capacity: one GPU's peak, or all CPU processes' together."""
        return self.per_process * (1 if self.setup.gpus is not None else self.setup.world)

    @property
    def fits(self) -> bool:
        return self.setup.capacity <= 0 or self.total <= self.setup.capacity

    def where(self) -> str:
        s = self.setup
        kind = {"fsdp2": "FSDP2, sharded", "ddp": "DDP, full copies", "single": "one process"}[s.strategy]
        if s.gpus is not None:
            return f"{s.world} GPU{'s' if s.world > 1 else ''} ({kind}), per GPU"
        return f"this machine's CPU, {s.world} process{'es' if s.world > 1 else ''} ({kind}), per process"

    def table(self) -> str:
        s, z = self.setup, self.sizes
        parts = ", ".join(f"{k} {_count(v)}" for k, v in z.parts().items() if v)
        precision = "bf16 autocast, fp32 master weights (Accelerate mixed precision)" if s.precision == "bf16" else "fp32"
        lines = [
            f"memory plan: {self.where()}; precision {precision}",
            f"  model: {z.family}, {_count(z.total)} parameters ({parts})",
        ]
        if self.teacher is not None and self.teacher.total != z.total:
            lines.append(f"  teacher: {self.teacher.family}, {_count(self.teacher.total)} parameters")
        width = max(len(t.name) for t in self.terms) if self.terms else 10
        lines.append(f"  {'term':<{width}}  {'GiB':>8}  when")
        for t in self.terms:
            lines.append(f"  {t.name:<{width}}  {_gib(t.bytes):>8}  {t.when}{': ' + t.note if t.note else ''}")
        lines.append(f"  {'peak, training':<{width}}  {_gib(self.training_peak):>8}")
        if self.warmstart_peak:
            lines.append(f"  {'peak, warm start':<{width}}  {_gib(self.warmstart_peak):>8}")
        if s.gpus is None and s.world > 1:
            lines.append(f"  {f'all {s.world} processes':<{width}}  {_gib(self.total):>8}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        cap = f"{_gib(s.capacity).strip()} GiB ({s.capacity_label})" if s.capacity else "unknown"
        lines.append(f"  total {_gib(self.total).strip()} GiB of {cap}: {verdict}")
        return "\n".join(lines)

    def check(self) -> None:
        """Refuse, on one line naming what to change, a plan that does not fit."""
        if self.fits:
            return
        s = self.setup
        what = "per GPU" if s.gpus is not None else f"for {s.world} process{'es' if s.world > 1 else ''}"
        change = "; ".join(self.advice) if self.advice else "no change of the recipe's memory knobs fits"
        raise RelufyError(
            f"memory plan: {_gib(self.total).strip()} GiB {what} does not fit {_gib(s.capacity).strip()} GiB "
            f"({s.capacity_label}); change: {change}"
        )


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def activation_bytes(sizes: ModelSizes, setup: Setup, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (see the module docstring)."""
    compute = 2 if setup.precision == "bf16" else 4
    norm_cast = 2 * sizes.hidden * 2 if setup.precision == "bf16" else 0  # bf16 copies of the norms' outputs

    def per_token(acts: tuple[float, float], layers: int) -> float:
        return acts[0] * 4 + acts[1] * compute + norm_cast * layers

    outside = (4 * sizes.hidden + 1) * 4  # embedding output, final norm
    if checkpointing:
        per = sizes.layers * sizes.hidden * 4 + per_token(sizes.act_largest_layer, 1) + outside
    else:
        per = per_token(sizes.act_layers, sizes.layers) + outside
    return int(per * setup.tokens)


def logits_bytes(sizes: ModelSizes, setup: Setup) -> tuple[int, str]:
    unit = setup.tokens * sizes.vocab * 4
    units = LOGITS_LM + (LOGITS_LM_BF16 if setup.precision == "bf16" else 0)
    what = "LM loss"
    if setup.distill:
        units += LOGITS_KL_TOP_K if setup.top_k else LOGITS_KL
        what += f" + KL on the teacher's top {setup.top_k}" if setup.top_k else " + KL over the vocabulary"
    return int(units * unit), f"{units:g} x {setup.tokens} tokens x {sizes.vocab} vocab x 4 B ({what})"


def build_plan(sizes: ModelSizes, setup: Setup, teacher: ModelSizes | None = None, advise: bool = True) -> MemoryPlan:
    """The plan of ``setup`` for a model of ``sizes`` (``teacher``: the teacher's, default the same)."""
    teacher = teacher or sizes
    plan = MemoryPlan(setup, sizes, teacher)
    t = plan.terms
    s = setup
    n = s.world if s.sharded else 1
    gpu = s.gpus is not None
    compute = 2 if s.precision == "bf16" else 4
    div = f" / {n}" if n > 1 else ""

    lora = s.lora or 0
    trainable = lora if s.lora is not None else sizes.total
    weights = _ceil(sizes.total + lora, n) * 4
    t.append(Term("weights (fp32)", weights, RESIDENT, f"{_count(sizes.total + lora)} x 4 B{div}"))
    what = "the LoRA adapters" if s.lora is not None else "every parameter"
    # with accumulation the first micro-batch's gradients are held through the next forward and backward;
    # without, they replace the activations as the backward frees them and peak at the optimizer step
    held = RESIDENT if s.grad_accum > 1 else OPTIMIZER
    t.append(Term("gradients (fp32)", _ceil(trainable, n) * 4, held, f"{what}, {_count(trainable)} x 4 B{div}"))
    t.append(Term("optimizer (AdamW)", _ceil(trainable, n) * 8, RESIDENT, f"2 fp32 moments x {_count(trainable)}{div}"))
    t.append(Term("optimizer step temporary", _ceil(trainable, n) * 4, OPTIMIZER, "foreach AdamW's sqrt(v), fp32"))
    if s.strategy == "ddp":
        t.append(Term("DDP gradient buckets", trainable * 4, RESIDENT, "a second copy of the gradients"))
    teacher_bytes = s.teacher_bytes
    teacher_dtype = "bf16" if teacher_bytes == 2 else "fp32"
    teacher_w = _ceil(teacher.total, n) * teacher_bytes
    if s.distill:
        t.append(Term(f"teacher ({teacher_dtype})", teacher_w, RESIDENT, f"{_count(teacher.total)} x {teacher_bytes} B{div}"))
    if s.sharded and n > 1:
        unit = max(sizes.largest_layer, sizes.root)
        t.append(
            Term(
                "FSDP2 in flight",
                3 * unit * compute,
                FORWARD,
                f"2 units all-gathered + 1 unit's gradients, {_count(unit)} x {compute} B each",
            )
        )
        if s.distill:
            tunit = max(teacher.largest_layer, teacher.root)
            t.append(Term("FSDP2 in flight, teacher", 2 * tunit * teacher_bytes, FORWARD, "2 units all-gathered"))
    elif s.precision == "bf16":
        t.append(Term("autocast bf16 weight copies", sizes.layer_linear * 2, FORWARD, "every linear's weight, 2 B"))
    acts = activation_bytes(sizes, s, s.checkpointing)
    plan.activations_other = activation_bytes(sizes, s, not s.checkpointing)
    ck = "with" if s.checkpointing else "without"
    other = "with" if not s.checkpointing else "without"
    t.append(
        Term(
            "activations",
            acts,
            FORWARD,
            f"{s.micro_batch} x {s.seq_len} tokens, {ck} gradient checkpointing (the recipe's; {other}: "
            f"{_gib(plan.activations_other).strip()} GiB)",
        )
    )
    logits, note = logits_bytes(sizes, s)
    t.append(Term("logits", logits, FORWARD, note))
    if not gpu:
        t.append(Term("baseline (Python, torch, data)", CPU_BASELINE, RESIDENT, "measured"))
        t.append(
            Term(
                "allocator retention",
                int(CPU_RETAINED * (activation_bytes(sizes, s, False) + logits)),
                FORWARD,
                f"{CPU_RETAINED:g} x (activations without checkpointing + logits): freed, kept by glibc",
            )
        )
    else:
        t.append(Term("CUDA context, NCCL", CUDA_OVERHEAD, RESIDENT))
    if s.warmstart_tokens:
        # stages run one after the other, each freeing what it recorded: the most recordings are the
        # smallest blocks', the largest fit the largest blocks' (both counted: a bound for several stages)
        k, kr = max(s.warmstart_blocks), min(s.warmstart_blocks)
        units_here = _ceil(_ceil(sizes.layers, kr), s.world)  # this process's layers, or blocks
        unit = "layers" if kr == 1 else f"blocks of {kr} layers"
        rec = 2 * s.warmstart_tokens * sizes.hidden * units_here * teacher_bytes
        copy = 2 * s.warmstart_tokens * sizes.hidden * 4
        t.append(
            Term(
                "warm start: recordings",
                rec + copy,
                WARMSTART,
                f"2 x {s.warmstart_tokens} tokens x {sizes.hidden} x {units_here} {unit} x {teacher_bytes} B "
                f"+ one {'layer' if kr == 1 else 'block'}'s fp32 copy",
            )
        )
        if k > 1:  # a fit step backpropagates through the block: its FFNs' gradients and Adam moments, its activations
            ffn_block = min(k, sizes.layers) * _ceil(sizes.ffn, sizes.layers)
            fit_tokens = max(1, s.warmstart_batch // s.seq_len) * s.seq_len
            acts = activation_bytes(sizes, replace(s, micro_batch=fit_tokens // s.seq_len, precision="fp32"), False)
            acts = acts * min(k, sizes.layers) // sizes.layers
            t.append(
                Term(
                    "warm start: block fit",
                    3 * ffn_block * 4 + acts,
                    WARMSTART,
                    f"{k} layers' FFN gradients and Adam moments (fp32) + activations of {fit_tokens} tokens",
                )
            )
        t.append(Term("warm start: teacher", teacher_w, WARMSTART, f"{teacher_dtype}{div}"))
        if s.sharded and n > 1:
            tunit = max(teacher.largest_layer, teacher.root)
            t.append(Term("warm start: teacher in flight", 2 * tunit * teacher_bytes, WARMSTART, "2 units all-gathered"))
        if gpu:
            if k == 1:
                ffn = _ceil(sizes.ffn, sizes.layers) * 4
                t.append(Term("warm start: FFN being fitted", ffn, WARMSTART, "one layer's FFN, fp32"))
            else:
                layer = sizes.largest_layer * min(k, sizes.layers)
                t.append(Term("warm start: block being fitted", layer * 4, WARMSTART, f"{k} whole layers, fp32"))
            t.append(Term("warm start: CUDA context", CUDA_OVERHEAD, WARMSTART))
        else:
            t.append(Term("warm start: student", sizes.total * 4, WARMSTART, "fp32, whole"))
            t.append(Term("warm start: baseline", CPU_BASELINE, WARMSTART))
            t.append(Term("warm start: allocator retention", int(CPU_RETAINED * rec), WARMSTART, "of the recordings"))
    if advise and not plan.fits:
        plan.advice = _advice(sizes, s, teacher)
    return plan


def _fits_on(sizes: ModelSizes, s: Setup, teacher: ModelSizes, world: int) -> bool:
    trial = replace(s, world=world, gpus=world, strategy="fsdp2" if world > 1 else "single")
    return build_plan(sizes, trial, teacher, advise=False).fits


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _advice(sizes: ModelSizes, s: Setup, teacher: ModelSizes) -> list[str]:
    """What would make the plan fit, each change on its own, with the total it gives."""
    base = build_plan(sizes, s, teacher, advise=False).total
    out = []

    def saves(label: str, other: Setup) -> None:
        plan = build_plan(sizes, other, teacher, advise=False)
        if plan.total < base:
            fit = "fits" if plan.fits else "still too much"
            out.append(f"{label} ({_gib(plan.total).strip()} GiB, {fit})")

    if s.gpus is not None:
        need = next((w for w in range(1, 4097) if _fits_on(sizes, s, teacher, w)), None)
        flag = "--strategy fsdp2, " if s.strategy != "fsdp2" else ""
        if need is None:
            out.append("shard with FSDP2: no GPU count fits this micro-batch")
        elif need > s.world or s.strategy != "fsdp2":
            out.append(f"shard with FSDP2 over {need}+ GPUs ({flag}--gpus x --nodes >= {need})")
    else:
        out.append("for a GPU run, plan it with --gpus N [--nodes M] [--gpu-memory SIZE]")
        if s.strategy != "fsdp2" and s.world > 1:
            saves("shard with FSDP2 (--strategy fsdp2)", replace(s, strategy="fsdp2"))
    if not s.checkpointing:
        saves("gradient checkpointing (model.gradient_checkpointing=true)", replace(s, checkpointing=True))
    if s.micro_batch > 1:
        saves(
            f"budget.micro_batch_size=1 (budget.grad_accum={s.grad_accum * s.micro_batch} keeps the batch)",
            replace(s, micro_batch=1, grad_accum=s.grad_accum * s.micro_batch),
        )
    if s.lora is None and s.lora_default:
        saves("LoRA (lora: {r: 16})", replace(s, lora=s.lora_default))
    if (s.distill or s.warmstart_tokens) and s.teacher_bytes == 4:
        saves("teacher in bf16 (sparsity.distill.teacher_dtype=bf16)", replace(s, teacher_dtype="bf16", distill=s.distill))
    if s.distill and not s.top_k:
        saves("distil on the teacher's top 64 (sparsity.distill.top_k=64)", replace(s, top_k=64))
    return out


# ---- from a recipe --------------------------------------------------------------------------------


def read_config(spec: str) -> dict:
    """The config dict of a model folder, .gguf file or hub id (``org/name[@revision]``: its
    config.json only, never the weights)."""
    import json
    from pathlib import Path

    from ..io.hub import download_file, split_revision
    from ..io.source import resolve
    from ..modeling.formats import as_relufy, read_config

    hub = None if Path(spec).expanduser().exists() else split_revision(str(spec))
    if hub is None:
        return read_config(resolve(spec))
    return as_relufy(json.loads(download_file(hub[0], "config.json", hub[1], None).read_text()), str(spec))


def plan_recipe(recipe, gpus=None, nodes: int = 1, gpu_memory=None, strategy=None, processes=None) -> MemoryPlan:
    """The memory plan of ``recipe`` (see ``setup_from_recipe``); reads the model's (and a separate
    teacher's) config.json, nothing else."""
    spec = recipe.model
    config = dict(spec.config) if spec.config is not None else read_config(spec.path)
    activation = decisions.student_activation(spec.activation, RelufyBlock.read(config, str(spec.path or "model.config")))
    sizes = model_sizes(config, activation)
    teacher = None
    path = decisions.teacher_path(recipe)
    if decisions.loads_teacher(recipe.sparsity) and path and path != spec.path:
        teacher = model_sizes(read_config(path), "swiglu")
    lora = recipe.lora
    targets = (lora.r, lora.target_modules, lora.target_parameters) if lora else (16, _DEFAULT_LORA, ())
    try:
        adapters = lora_parameters(config, *targets)
    except Exception:  # noqa: BLE001 - peft refuses these targets: the run will say so; plan without LoRA's share
        adapters = 0
    setup = setup_from_recipe(
        recipe,
        gpus,
        nodes,
        gpu_memory,
        strategy,
        processes,
        lora=adapters if lora else None,
        lora_default=0 if lora else adapters,
    )
    return build_plan(sizes, setup, teacher)


_DEFAULT_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
