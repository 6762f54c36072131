"""Tiny random models, one per supported family, built in code from transformers configs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=96,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
MOE = dict(num_experts_per_tok=2, norm_topk_prob=True)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "mixtral": dict(num_local_experts=4, **MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, **MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, **MOE),
    "deepseek_v3": dict(
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=24,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        num_key_value_heads=4,
    ),
    "olmoe": dict(num_experts=4, **MOE),
}
FAMILIES = list(FAMILY_CONFIGS)
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"]


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILY_CONFIGS[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():  # random init, larger than HF's 0.02 std so activations are not ~0
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model.eval()


def save_tiny(family: str, path, seed: int = 0, **overrides):
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(path)
    return model


def corpus() -> str:
    """Real English text present on every machine: Python's own pydoc topics."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def tiny_tokenizer(vocab_size: int = COMMON["vocab_size"]):
    """A BPE tokenizer trained in code on ``corpus()`` with the tiny models' vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, limit_alphabet=vocab_size - 20, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    tok.train_from_iterator([corpus()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_with_tokenizer(family: str, path, seed: int = 0, **overrides):
    model = save_tiny(family, path, seed, **overrides)
    tiny_tokenizer().save_pretrained(path)
    return model


def drelu_with_text(root, family: str = "llama", chars: int = 3000):
    """Under ``root``: a tiny ``family`` model with its tokenizer (``root/<family>``), its dReLU
    conversion (``root/drelu``, returned) and ``root/text.txt`` holding ``chars`` of the corpus."""
    import relufy

    save_tiny_with_tokenizer(family, root / family)
    (root / "text.txt").write_text(corpus()[:chars])
    return relufy.convert(root / family, root / "drelu")
