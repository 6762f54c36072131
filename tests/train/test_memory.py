"""The memory plan of ``relufy train --dry-run`` (relufy.train.memory): parameter counts from the
config against real models of every family, the activation formula against the tensors autograd
saves, the plan's terms reacting to the recipe's knobs, the 47B MoE recipe refused under DDP and
planned under FSDP2, and the CLI's table and refusals. Measured peak RSS of real runs:
benchmarks/bench_memory_plan.py (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safety import assert_one_line
from tiny import FAMILIES, MOE_FAMILIES, tiny_config, tiny_model, tiny_tokenizer
from trainkit import recipe_dict, write_recipe

from relufy.errors import RelufyError
from relufy.train import memory
from relufy.train.memory import GiB, Setup, activation_bytes, build_plan, lora_parameters, model_sizes, plan_recipe
from relufy.train.recipe import TrainOptions, load_recipe, validate

ROOT = Path(__file__).parents[2]
# config variants whose parameters the formula must follow too
VARIANTS = {
    "tied": {"tie_word_embeddings": True},
    "bias": {"attention_bias": True},
    "wide-heads": {"hidden_size": 48, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1},
}
FAMILY_VARIANTS = [
    ("llama", {"mlp_bias": True}),
    ("qwen2_moe", {"mlp_only_layers": [0]}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "qkv_bias": False}),
    ("qwen3_moe", {"mlp_only_layers": [1]}),
    ("deepseek_v3", {"first_k_dense_replace": 0}),
    ("deepseek_v3", {"q_lora_rank": 12, "n_shared_experts": 2}),
]
CASES = [(f, {}) for f in FAMILIES] + [(f, v) for f in FAMILIES for v in VARIANTS.values()] + FAMILY_VARIANTS
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json, its sizes): 134,515,008 parameters
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
# mistralai/Mixtral-8x7B-v0.1's config.json (the 47B MoE of recipes/turbosparse-mixtral-8x7b.yaml)
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}


def _name(case) -> str:
    family, overrides = case
    return family + "".join(f"-{k}" for k in overrides)


def _real_parts(model) -> dict[str, int]:
    parts = {"attention": 0, "mlp": 0, "embedding": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            parts["attention"] += p.numel()
        elif ".mlp." in name:
            parts["mlp"] += p.numel()
        elif "embed_tokens" in name:
            parts["embedding"] += p.numel()
        elif name.startswith("lm_head"):
            parts["lm_head"] += p.numel()
    return parts


@pytest.mark.parametrize("case", CASES, ids=[_name(c) for c in CASES])
def test_parameter_counts_match_real_models(case):
    """Total and per part, from the config alone, equal the parameters of the real model."""
    family, overrides = case
    model = tiny_model(family, **overrides)
    sizes = model_sizes(tiny_config(family, **overrides))
    assert sizes.total == sum(p.numel() for p in model.parameters())
    real = _real_parts(model)
    assert sizes.attention == real["attention"]
    assert sizes.ffn + sizes.router == real["mlp"]
    assert sizes.embedding == real["embedding"]
    assert sizes.lm_head == real["lm_head"]
    # a config dict (config.json) gives the same sizes as the transformers config
    assert model_sizes(tiny_config(family, **overrides).to_dict()) == sizes


def test_parameter_counts_of_smollm2():
    sizes = model_sizes(SMOLLM2)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SMOLLM2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert sizes.total == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (sizes.embedding, sizes.lm_head, sizes.ffn) == (28_311_552, 0, 79_626_240)


def test_parameter_counts_of_mixtral_8x7b():
    sizes = model_sizes(MIXTRAL_8X7B)
    assert sizes.total == 46_702_792_704  # Mixtral-8x7B's published count
    assert sizes.experts == 32 * 8 * 3 * 4096 * 14336


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_counts_match_peft(family):
    """The adapters the plan counts (on the meta device) are those peft adds to the real model."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    params = ["experts.gate_up_proj", "experts.down_proj"] if family in MOE_FAMILIES else []
    real = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules=targets, target_parameters=params or None))
    expected = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert lora_parameters(tiny_config(family).to_dict(), 4, targets, params) == expected


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saves in one forward (weights and logits excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    vocab = model.config.vocab_size
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.dim() > 1 and t.shape[-1] != vocab and storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_activation_formula_matches_saved_tensors(family):
    """The activation term is what autograd keeps for the backward: within 15% on tiny models
    (fp32, SDPA), with and without gradient checkpointing (there: the layer inputs only)."""
    from relufy.modeling.load import swap_activation

    model = swap_activation(tiny_model(family, num_hidden_layers=4), "drelu").train()
    sizes = model_sizes(model.config, "drelu")
    ids = torch.randint(3, 96, (2, 32))
    setup = Setup(seq_len=32, micro_batch=2)
    measured = _saved_activation_bytes(model, ids)
    assert activation_bytes(sizes, setup, False) == pytest.approx(measured, rel=0.15)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    saved_inputs = _saved_activation_bytes(model, ids)
    planned = activation_bytes(sizes, setup, True)
    assert saved_inputs <= planned < activation_bytes(sizes, setup, False)


# ---- the plan's terms ------------------------------------------------------------------------------


def _recipe(base, tmp_path, **overrides):
    raw = recipe_dict(base, tmp_path / "out", **overrides)
    return validate(raw)


def _term(plan, name) -> int:
    return sum(t.bytes for t in plan.terms if t.name == name)


def test_gradient_checkpointing_reduces_activations(base, tmp_path):
    plain = plan_recipe(_recipe(base, tmp_path, data__seq_len=64), gpus=1)
    ckpt = plan_recipe(_recipe(base, tmp_path, data__seq_len=64, model__gradient_checkpointing=True), gpus=1)
    assert _term(ckpt, "activations") < _term(plain, "activations")
    # each plan states the other setting's figure
    assert ckpt.activations_other == _term(plain, "activations")
    assert plain.activations_other == _term(ckpt, "activations")
    assert "without gradient checkpointing (the recipe's" in plain.table()
    assert "with gradient checkpointing (the recipe's" in ckpt.table()


def test_top_k_reduces_the_teacher_logits(base, tmp_path):
    full = plan_recipe(_recipe(base, tmp_path, sparsity={"distill": {"weight": 1.0}}), gpus=1)
    top = plan_recipe(_recipe(base, tmp_path, sparsity={"distill": {"weight": 1.0, "top_k": 8}}), gpus=1)
    plain = plan_recipe(_recipe(base, tmp_path), gpus=1)
    assert _term(plain, "logits") < _term(top, "logits") < _term(full, "logits")
    unit = 2 * 32 * 96 * 4  # micro-batch x seq_len x vocab x fp32
    assert _term(full, "logits") - _term(top, "logits") == 3 * unit
    assert "top 8" in top.table()


def test_lora_trains_only_the_adapters(base, tmp_path):
    full = plan_recipe(_recipe(base, tmp_path), gpus=1)
    lora = plan_recipe(_recipe(base, tmp_path, lora={"r": 4}), gpus=1)
    for name in ("gradients (fp32)", "optimizer (AdamW)", "optimizer step temporary"):
        assert _term(lora, name) < _term(full, name) / 5, name
    assert _term(lora, "weights (fp32)") > _term(full, "weights (fp32)")  # the frozen model + adapters
    adapters = lora.setup.lora
    assert adapters and _term(lora, "optimizer (AdamW)") == 8 * adapters


def test_teacher_dtype_and_sharding(base, tmp_path):
    recipe = _recipe(base, tmp_path, sparsity={"distill": {"weight": 1.0}, "ffn_warmstart": {"tokens": 256}})
    one = plan_recipe(recipe, gpus=1)
    four = plan_recipe(recipe, gpus=4)  # FSDP2 by default: sharded, teacher bf16 (auto)
    ddp = plan_recipe(recipe, gpus=4, strategy="ddp")
    teacher = one.sizes.total
    assert _term(one, "teacher (fp32)") == 4 * teacher
    assert _term(four, "teacher (bf16)") == 2 * -(-teacher // 4)
    assert _term(ddp, "teacher (fp32)") == 4 * teacher
    assert _term(four, "weights (fp32)") == 4 * -(-teacher // 4)
    assert _term(ddp, "DDP gradient buckets") == 4 * teacher and _term(four, "DDP gradient buckets") == 0
    assert _term(four, "FSDP2 in flight") > 0
    # the warm start's recordings: 2 x tokens x hidden x layers (per process) x teacher dtype
    tokens, hidden = 256 // 32 * 32, 32
    assert _term(one, "warm start: recordings") == 2 * tokens * hidden * 2 * 4 + 2 * tokens * hidden * 4
    assert _term(four, "warm start: recordings") == 2 * tokens * hidden * 1 * 2 + 2 * tokens * hidden * 4


def test_plan_and_loop_follow_the_same_teacher_rules(base, tmp_path, monkeypatch):
    """The teacher's dtype and whether it stays are decided once (relufy.train.decisions): a rule
    changed there changes both what the run sets up and what the plan sizes."""
    from types import SimpleNamespace

    import relufy.modeling.load
    from relufy.train import decisions
    from relufy.train.loop import RecipeRun

    recipe = _recipe(base, tmp_path, sparsity={"distill": {"weight": 1.0}})  # teacher_dtype auto, one GPU: fp32

    def loop_teacher_dtype():
        loaded = {}

        def fake_load(path, activation=None, dtype=None, **kwargs):
            loaded.update(path=path, activation=activation, dtype=dtype)
            return torch.nn.Linear(1, 1)

        monkeypatch.setattr(relufy.modeling.load, "load", fake_load)
        run = SimpleNamespace(recipe=recipe, sharded=False, teacher=None)
        run._teacher_dtype = lambda: RecipeRun._teacher_dtype(run)
        RecipeRun.load_teacher(run)
        assert loaded["path"] == decisions.teacher_path(recipe) and loaded["activation"] == "swiglu"
        return loaded["dtype"]

    teacher = plan_recipe(recipe, gpus=1).sizes.total
    assert _term(plan_recipe(recipe, gpus=1), "teacher (fp32)") == 4 * teacher
    assert loop_teacher_dtype() == torch.float32

    seen = []

    def bf16_always(choice, sharded):
        seen.append((choice, sharded))
        return "bf16"

    monkeypatch.setattr(decisions, "teacher_dtype", bf16_always)
    plan = plan_recipe(recipe, gpus=1)
    assert _term(plan, "teacher (bf16)") == 2 * teacher and _term(plan, "teacher (fp32)") == 0
    assert loop_teacher_dtype() == torch.bfloat16
    assert ("auto", False) in seen  # both asked with the recipe's choice, unsharded

    # whether the teacher stays for the training steps (after the warm start)
    monkeypatch.setattr(decisions, "keeps_teacher", lambda sparsity: False)
    plan = plan_recipe(recipe, gpus=1)
    assert not [t for t in plan.terms if t.name.startswith("teacher")]
    run = SimpleNamespace(recipe=recipe, teacher=object(), start_checkpoint=None)
    RecipeRun.warm_start(run)
    assert run.teacher is None


def test_block_warmstart_plan(base, tmp_path):
    """Blocks of layers: recordings per block (both layers of the tiny model in one), one block's
    whole layers on the GPU, and the fit's FFN gradients, Adam moments and activations."""
    per_ffn = _recipe(base, tmp_path, sparsity={"ffn_warmstart": {"tokens": 256}})
    block = _recipe(base, tmp_path, sparsity={"ffn_warmstart": {"tokens": 256, "block": 2}})
    a, b = plan_recipe(per_ffn, gpus=1), plan_recipe(block, gpus=1)
    tokens, hidden = 256, 32
    assert _term(a, "warm start: recordings") == 2 * tokens * hidden * 2 * 4 + 2 * tokens * hidden * 4
    assert _term(b, "warm start: recordings") == 2 * tokens * hidden * 1 * 4 + 2 * tokens * hidden * 4
    assert _term(b, "warm start: block being fitted") == 2 * b.sizes.largest_layer * 4
    assert _term(b, "warm start: block fit") > 3 * b.sizes.ffn * 4  # + the activations of the fit's batch
    assert "warm start: block fit" not in {t.name for t in a.terms}
    assert "blocks of 2 layers" in b.table()
    # stages [1, 2]: the per-FFN stage's recordings (the most) and the block stage's fit (the largest)
    staged = plan_recipe(_recipe(base, tmp_path, sparsity={"ffn_warmstart": {"tokens": 256, "block": [1, 2]}}), gpus=1)
    assert _term(staged, "warm start: recordings") == _term(a, "warm start: recordings")
    assert _term(staged, "warm start: block fit") == _term(b, "warm start: block fit")
    assert _term(staged, "warm start: block being fitted") == _term(b, "warm start: block being fitted")


def test_cpu_plan_per_process(base, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = plan_recipe(_recipe(base, tmp_path))
    two = plan_recipe(_recipe(base, tmp_path), processes=2)
    assert one.setup.gpus is None and one.setup.world == 1 and one.setup.strategy == "single"
    assert two.setup.strategy == "ddp" and two.total == 2 * two.per_process
    assert _term(one, "baseline (Python, torch, data)") == memory.CPU_BASELINE
    assert "CUDA context, NCCL" not in {t.name for t in one.terms}
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launch's dry run plans its processes
    assert plan_recipe(_recipe(base, tmp_path)).setup.world == 2


def test_gradients_are_held_through_the_forward_only_with_accumulation(base, tmp_path):
    one = plan_recipe(_recipe(base, tmp_path, budget__grad_accum=1), gpus=1)
    two = plan_recipe(_recipe(base, tmp_path, budget__grad_accum=2), gpus=1)

    def when(plan):
        return next(t.when for t in plan.terms if t.name == "gradients (fp32)")

    assert when(one) == memory.OPTIMIZER and when(two) == memory.RESIDENT
    assert two.training_peak > one.training_peak


def test_parse_size():
    assert memory.parse_size("80GB") == 80 * 10**9
    assert memory.parse_size("141GiB") == 141 * 2**30
    assert memory.parse_size(" 80 ") == 80 * 10**9
    assert memory.parse_size("0.5TB") == 5 * 10**11
    for bad in ("eighty", "80XB", "-5GB", "0GB", "", "80 GB GB"):
        with pytest.raises(ValueError):
            memory.parse_size(bad)


@pytest.mark.parametrize("bad", ["eighty", "80XB", "0GB"])
def test_malformed_gpu_memory_is_one_line(bad):
    with pytest.raises(RelufyError, match="--gpu-memory") as e:
        TrainOptions.build(dry_run=True, gpus=8, gpu_memory=bad)
    assert "\n" not in str(e.value)


# ---- the 47B MoE recipe ----------------------------------------------------------------------------


@pytest.fixture
def mixtral(tmp_path):
    """recipes/turbosparse-mixtral-8x7b.yaml with model.path a folder holding only the converted
    Mixtral-8x7B's config.json (as relufy convert writes it; no weights) and a tokenizer (the dry
    run loads it, as the run does), and a local text."""
    from relufy.families import family_for
    from relufy.modeling.remote import relufy_config_dict

    folder = tmp_path / "mixtral-drelu"
    folder.mkdir()
    config = relufy_config_dict(MIXTRAL_8X7B, family_for("mixtral"), "drelu", None, "mistralai/Mixtral-8x7B-v0.1")
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "text.txt").write_text("some text\n" * 100)
    overrides = [f"model.path={folder}", f"output_dir={tmp_path / 'out'}", f"data.sources=[{{data: {tmp_path / 'text.txt'}}}]"]
    return ROOT / "recipes/turbosparse-mixtral-8x7b.yaml", overrides


def test_mixtral_on_8_gpus_with_ddp_is_refused_naming_fsdp2(mixtral):
    recipe = load_recipe(mixtral[0], mixtral[1])
    plan = plan_recipe(recipe, gpus=8, gpu_memory="80GB", strategy="ddp")
    assert plan.sizes.total == 46_702_792_704 and plan.setup.precision == "bf16"
    assert not plan.fits
    assert _term(plan, "weights (fp32)") == 4 * plan.sizes.total  # a full copy per GPU
    with pytest.raises(RelufyError) as e:
        plan.check()
    message = str(e.value)
    assert "\n" not in message and "does not fit" in message and "FSDP2" in message
    import re

    need = int(re.search(r"FSDP2 over (\d+)\+ GPUs", message).group(1))
    # FSDP2 fits on that many GPUs and not on one fewer; on the 8 GPUs it still does not
    assert plan_recipe(recipe, gpus=need, gpu_memory="80GB").fits
    assert not plan_recipe(recipe, gpus=need - 1, gpu_memory="80GB").fits
    assert not plan_recipe(recipe, gpus=8, gpu_memory="80GB").fits
    assert 8 < need <= 64  # the recipe's comment launches 64 processes
    # the recipe checkpoints activations: the table says so and what it would be without
    fsdp = plan_recipe(recipe, gpus=64, gpu_memory="80GB")
    assert fsdp.fits and "with gradient checkpointing (the recipe's" in fsdp.table()
    assert fsdp.activations_other > 10 * _term(fsdp, "activations")


def test_mixtral_refusal_through_the_cli(mixtral, cli):
    recipe, overrides = mixtral
    code, err, out = cli("train", recipe, *overrides, "--dry-run", "--gpus", "8", "--strategy", "ddp")
    assert_one_line(code, err, "does not fit", "FSDP2")
    assert "# memory plan: 8 GPUs (DDP, full copies), per GPU" in out
    assert "46.70B parameters" in out
    code, err, out = cli("train", recipe, *overrides, "--dry-run", "--gpus", "8", "--nodes", "8")
    assert code == 0, err
    assert "64 GPUs (FSDP2, sharded)" in out and ": fits" in out


# ---- the CLI ---------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_after_the_recipe(base, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    code, err, out = cli("train", recipe, "--dry-run")
    assert code == 0, err
    assert out.index("name: t") < out.index("# memory plan: this machine's CPU, 1 process")
    for term in ("weights (fp32)", "gradients (fp32)", "optimizer (AdamW)", "activations", "logits", "baseline"):
        assert f"#   {term}" in out, term
    assert ": fits" in out
    code, err, out = cli("train", recipe, "--dry-run", "--gpus", "2", "--gpu-memory", "40GiB")
    assert code == 0, err
    assert "# memory plan: 2 GPUs (FSDP2, sharded), per GPU" in out and "FSDP2 in flight" in out
    assert "of 40.00 GiB (40GiB = 40.0 GiB per GPU)" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_plan_that_does_not_fit_exits_2(base, tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    code, err, out = cli("train", recipe, "--dry-run", "--gpus", "1", "--gpu-memory", "100MB")
    assert_one_line(code, err, "memory plan:", "does not fit", "(100MB = 0.1 GiB per GPU)")
    assert "#   activations" in out and "DOES NOT FIT" in out  # the table came first


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dry-run", "--gpus", "8", "--gpu-memory", "eighty"], "--gpu-memory"),
        (["--gpus", "8"], "--gpus plans memory"),
        (["--dry-run", "--nodes", "2"], "--nodes goes with --gpus"),
        (["--dry-run", "--gpus", "2", "--processes", "2"], "--processes"),
        (["--dry-run", "--gpus", "0"], "--gpus"),
        (["--dry-run", "--strategy", "zero3"], "--strategy"),
    ],
    ids=["memory", "no-dry-run", "nodes", "processes", "zero-gpus", "strategy"],
)
def test_plan_flags_refused_on_one_line(base, tmp_path, cli, args, needle):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    code, err, _ = cli("train", recipe, *args)
    assert_one_line(code, err, needle)


def test_plan_from_sizes_alone():
    """build_plan needs no recipe: SmolLM2 on one 80GB GPU fits, and check() lets it pass."""
    sizes = model_sizes(SMOLLM2)
    setup = Setup(seq_len=256, micro_batch=4, gpus=1, world=1, capacity=80 * 10**9)
    plan = build_plan(sizes, setup)
    plan.check()
    assert plan.fits and plan.total < 80 * 10**9 and plan.total > 2 * GiB
