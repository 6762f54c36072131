"""Recovery methods of relufy train: held-out text outside the training mixture
(data.eval_sources), ProSparse's staged L1 schedule, activation annealing and hidden-state
distillation; each checked against a computation by hand on the original transformers modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import corpus
from trainkit import recipe_dict, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from relufy.errors import RelufyError
from relufy.train.loop import anneal_blend, hidden_distance, l1_factor, train
from relufy.train.recipe import SparsitySpec, validate


@pytest.fixture(scope="module")
def outside(base):
    """Text that is not in the training file: a later part of the same corpus."""
    path = base / "outside.txt"
    if not path.exists():
        path.write_text(corpus()[60_000:75_000])
    return path


def _by_hand_ppl(model_dir, text_path, seq_len, n, trust_remote_code=False):
    """Perplexity of a transformers model (the original, or with ``trust_remote_code`` a relufy
    checkpoint through its own modeling code) on the first ``n`` packed sequences of a text file:
    tokens without special tokens, EOS after the text, loss on every next token."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text_path.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return math.exp(float(nll) / (n * (seq_len - 1)))


def test_eval_sources_scored_beside_the_in_domain_slice(base, outside, tmp_path, cli):
    """summary.json, metrics.jsonl and the log lines carry each eval source's perplexity and zeros;
    the teacher's perplexity on it equals the original transformers model's by hand, and the
    ratio is the student's over it."""
    raw = recipe_dict(
        base, tmp_path / "out", budget__max_steps=4, checkpoint__every=0, log__every=2, sparsity={"distill": {"weight": 1.0}}
    )
    raw["data"]["eval_sources"] = [{"data": str(outside), "max_tokens": 32 * 6}]
    raw["log"]["eval_steps"] = [1, 3, 50]  # 50: past the run's end, left out
    code, err, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    figures = summary["eval"]["outside"]
    assert figures["tokens"] == 6 * 32
    assert figures["ppl_original"] == pytest.approx(_by_hand_ppl(base / "llama", outside, 32, 6), rel=1e-5)
    assert figures["ratio"] == pytest.approx(figures["ppl"] / figures["ppl_original"])
    assert figures["ppl_before"] > figures["ppl"] > 1 and 0 < figures["sparsity"] < 1
    assert summary["heldout_ppl_original"] > 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # log.every 2, plus the eval steps 1 and 3
    assert [("eval" in r) for r in rows] == [True, False, True, False]
    assert rows[2]["eval"]["outside"]["ppl"] > 1 and rows[2]["heldout_ppl"] > 1
    lines = [line for line in err.splitlines() if " step 3/4 " in line]
    assert len(lines) == 1 and f"outside ppl {rows[2]['eval']['outside']['ppl']:.2f}" in lines[0], err


def test_final_cutoff_reaches_its_zeros_and_travels_with_the_model(base, outside, tmp_path, cli):
    """sparsity.final_cutoff: the final model's config carries one cutoff per FFN; loaded by its own
    modeling code it scores the outside text exactly as summary.json says, and without the cutoffs
    exactly as summary.json's ``cutoff.before`` says; the cutoffs reach their zeros."""
    import shutil

    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=4, checkpoint__every=0, log__every=2)
    raw["sparsity"] = {"l1": 0.01, "final_cutoff": {"sparsity": 0.9, "tokens": 32 * 8}}
    raw["data"]["eval_sources"] = [{"data": str(outside), "max_tokens": 32 * 6}]
    code, err, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    cut = summary["cutoff"]
    assert cut["sparsity"] == 0.9 and cut["tokens"] == 32 * 8
    assert cut["calibration_zeros"] == pytest.approx(0.9, abs=2e-3)
    assert "final cutoff: 2 FFN(s) cut" in err
    final = tmp_path / "out" / "final"
    cutoffs = json.loads((final / "config.json").read_text())["relufy"]["cutoffs"]
    assert sorted(cutoffs) == ["model.layers.0.mlp", "model.layers.1.mlp"] and all(c > 0 for c in cutoffs.values())
    after, before = summary["eval"]["outside"], cut["before"]["eval"]["outside"]
    assert after["ppl"] == pytest.approx(_by_hand_ppl(final, outside, 32, 6, trust_remote_code=True), rel=1e-5)
    assert after["sparsity"] == pytest.approx(0.9, abs=0.05) and after["sparsity"] > before["sparsity"] + 0.05
    assert summary["heldout_sparsity"] > cut["before"]["heldout_sparsity"]
    uncut = tmp_path / "uncut"
    shutil.copytree(final, uncut)
    config = json.loads((uncut / "config.json").read_text())
    del config["relufy"]["cutoffs"]
    (uncut / "config.json").write_text(json.dumps(config))
    assert before["ppl"] == pytest.approx(_by_hand_ppl(uncut, outside, 32, 6, trust_remote_code=True), rel=1e-5)
    assert before["ppl"] != pytest.approx(after["ppl"], rel=1e-4)
    assert "Magnitude cutoffs per FFN (relufy.cutoffs) calibrated to 90% zeros" in (final / "README.md").read_text()


def test_final_cutoff_needs_a_relufy_activation(base, tmp_path, cli):
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=2, checkpoint__every=0)
    raw["model"] = {"path": str(base / "llama")}  # the original, kept on SwiGLU
    raw["sparsity"] = {"final_cutoff": {"sparsity": 0.9}}
    code, err, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code != 0 and "sparsity.final_cutoff needs a relufy activation" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_eval_source_that_is_a_training_source_is_refused(base, tmp_path):
    raw = recipe_dict(base, tmp_path / "out")
    spelled = str(base / "llama" / ".." / "text.txt")  # the same file, spelled another way
    raw["data"]["eval_sources"] = [{"data": spelled}]
    with pytest.raises(RelufyError, match="also a training source"):
        validate(raw)
    raw["data"]["eval_sources"] = [{"data": "builtin:pydoc"}, {"data": "builtin:pydoc", "split": "x"}]
    with pytest.raises(RelufyError, match="two sources are labelled 'pydoc'"):
        validate(raw)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"sparsity": {"anneal_steps": 12}}, "sparsity.anneal_steps (12) must be below the run's 12 steps"),
    ],
)
def test_schedules_past_the_run_are_refused(base, tmp_path, cli, change, needle):
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=12, checkpoint__every=0)
    raw.update(change)
    code, err, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "run.json").exists()


def test_l1_schedules():
    linear = SparsitySpec(l1=1.0, l1_warmup_steps=4)
    assert [l1_factor(s, 10, linear) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    staged = SparsitySpec(l1=1.0, l1_schedule="sine-stages", l1_stages=2, l1_warmup_steps=2)
    got = [l1_factor(s, 8, staged) for s in range(8)]
    # stage 1 (steps 1-4) rises to 1/2 along a quarter sine over 2 steps, stage 2 to 1
    want = [0.5 * math.sin(math.pi / 4), 0.5, 0.5, 0.5, 0.5 + 0.5 * math.sin(math.pi / 4), 1.0, 1.0, 1.0]
    assert got == pytest.approx(want)
    halves = SparsitySpec(l1=1.0, l1_schedule="sine-stages", l1_stages=3)  # no warmup: half a stage to rise
    got = [l1_factor(s, 12, halves) for s in range(12)]
    assert got == sorted(got) and got[3] == pytest.approx(1 / 3) and got[-1] == pytest.approx(1.0)
    assert got[1] == pytest.approx(1 / 3) and got[0] == pytest.approx(math.sin(math.pi / 4) / 3)


def test_annealed_ffn_is_the_blend_of_the_original_modules():
    """While annealing, a swapped LlamaMLP computes (1 - a) x transformers' own SwiGLU MLP + a x the
    same MLP with only the activation changed to dReLU; a is (step + 1) / (N + 1), then None."""
    from tiny import tiny_model
    from transformers.models.llama.modeling_llama import LlamaMLP

    from relufy.modeling.load import swap_activation

    model = tiny_model("llama")
    reference = LlamaMLP(model.config)
    reference.load_state_dict(model.model.layers[0].mlp.state_dict())
    swapped = swap_activation(model, "drelu").model.layers[0].mlp
    x = torch.randn(3, 5, model.config.hidden_size)
    assert [anneal_blend(s, 3) for s in range(5)] == [0.25, 0.5, 0.75, None, None]
    with torch.no_grad():
        swiglu = reference(x)
        drelu = reference.down_proj(F.relu(reference.gate_proj(x)) * F.relu(reference.up_proj(x)))
        for a in (0.25, 0.75):
            swapped.relufy_blend = a
            torch.testing.assert_close(swapped(x), (1 - a) * swiglu + a * drelu, rtol=1e-5, atol=1e-6)
        swapped.relufy_blend = None
        torch.testing.assert_close(swapped(x), drelu, rtol=1e-6, atol=1e-7)


def test_annealed_run_ends_on_drelu_and_gains_zeros(base, tmp_path):
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=8, checkpoint__every=0, sparsity={"anneal_steps": 5})
    final = train(validate(raw), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["sparsity"] == 0.0  # SiLU never gives an exact zero: the blend has none
    assert rows[-1]["sparsity"] > 0.3  # dReLU alone from step 6 on
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["heldout_sparsity"] == pytest.approx(rows[-1]["sparsity"], abs=0.15)
    assert json.loads((final / "config.json").read_text())["relufy"]["activation"] == "drelu"


def test_hidden_distance_by_hand():
    torch.manual_seed(0)
    t = [torch.randn(2, 4, 8) for _ in range(3)]
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, -100, 5]])
    keep = labels != -100
    want = sum(((s[i] - t[i])[keep] ** 2).sum() / (t[i][keep] ** 2).sum() for i in (1, 2)) / 2
    torch.testing.assert_close(hidden_distance(s, t, labels), want)
    assert float(hidden_distance(t, t, labels)) == 0.0


def test_hidden_distillation_adds_its_term_to_the_first_loss(base, tmp_path):
    """The first step's loss with ``hidden_weight`` w exceeds the one without by exactly w x the
    hidden-state distance between the converted model and the original transformers model on the
    first batch (before any update both runs have the same weights)."""
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.train import mixture

    def first_loss(out, weight):
        distill = {"weight": 1.0, "hidden_weight": weight}
        raw = recipe_dict(base, out, budget__max_steps=2, checkpoint__every=0, sparsity={"distill": distill})
        train(validate(raw), show_progress=False)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"], raw

    plain, raw = first_loss(tmp_path / "a", 0.0)
    with_hidden, _ = first_loss(tmp_path / "b", 0.5)
    recipe = validate(raw)
    mix, _ = mixture.build(recipe.data, load_tokenizer(str(base / "llama-drelu")), recipe.seed)
    ids, labels = mix.local_batch(recipe.budget.micro_batch_size)
    import relufy

    student = relufy.load(base / "llama-drelu", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(base / "llama", dtype=torch.float32).eval()
    with torch.no_grad():
        d = hidden_distance(
            student(ids, output_hidden_states=True).hidden_states, teacher(ids, output_hidden_states=True).hidden_states, labels
        )
    assert float(d) > 0
    assert with_hidden - plain == pytest.approx(0.5 * float(d), rel=1e-4)


class _FixedMixture:
    """A mixture whose batches are the first ``n`` rows of fixed token ids (what the warm start draws)."""

    def __init__(self, ids):
        self.ids = ids

    def batch(self, n):
        from relufy.train.mixture import Batch

        return Batch.text(self.ids[:n])


def _seeded_ids(rows, seed):
    return torch.randint(0, 64, (rows, 32), generator=torch.Generator().manual_seed(seed))


def _drelu_by_hand(model):
    """The original transformers model with only the activation changed: every MLP computes
    down(relu(gate(x)) * relu(up(x)))."""
    import copy
    import types

    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(
            lambda self, x: self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x))), layer.mlp
        )
    return model


def _run_layers(model, start, stop, h):
    """Layers ``start..stop-1`` of a transformers model from hidden state ``h``, by transformers'
    own forward: the model cut to those layers, ``h`` as its input embeddings, no final norm."""
    import copy

    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList(cut.model.layers[start:stop])
    cut.config.num_hidden_layers = stop - start
    cut.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return cut.model(inputs_embeds=h, use_cache=False).last_hidden_state


def test_block_warmstart_fits_blocks_against_the_originals_hidden_states():
    """block=2 on a 4-layer llama: each block's error before the fit equals the original
    transformers model's by hand (its layers cut to the block, dReLU MLPs from the teacher's hidden
    state at the block's first layer, against the teacher's output of its last layer); the fit lowers
    every block's error and the whole model's; only FFN weights change; no gradient is left."""
    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    ids = _seeded_ids(16, 1)

    teacher = tiny_model("llama", num_hidden_layers=4).eval()
    student = swap_activation(tiny_model("llama", num_hidden_layers=4), "drelu")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    spec = WarmstartSpec(tokens=16 * 32, steps=30, lr=1e-2, l1=0.1, block=2)
    report = ffn_warmstart(student, teacher, _FixedMixture(ids), spec, torch.device("cpu"), seq_len=32, batch_tokens=128)
    assert [r["layers"] for r in report["layers"]] == [[0, 1], [2, 3]]

    hand = _drelu_by_hand(teacher)
    with torch.no_grad():
        states = teacher(ids, output_hidden_states=True, use_cache=False).hidden_states
    for row in report["layers"]:
        a, b = row["layers"][0], row["layers"][-1] + 1
        want = _run_layers(teacher, a, b, states[a])
        mse = float(F.mse_loss(_run_layers(hand, a, b, states[a]), want))
        assert row["mse_before"] == pytest.approx(mse, rel=1e-5)
        assert row["mse_after"] < 0.8 * row["mse_before"], row
        assert 0 < row["zeros_after"] < 1

    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".mlp." in k for k in changed), changed
    assert [n for n, p in student.named_parameters() if p.grad is not None] == []
    assert all(p.requires_grad for p in student.parameters())  # attention's frozen flags put back
    with torch.no_grad():
        out = teacher.model(ids).last_hidden_state
        err_fit = F.mse_loss(student.model(ids).last_hidden_state, out)
        err_unfit = F.mse_loss(hand.model(ids).last_hidden_state, out)
    assert err_fit < err_unfit


def test_warmstart_stages_fit_one_after_the_other():
    """block=[1, 2]: the per-FFN fit, then blocks of 2 from where it left, on the same tokens: the
    student equals two warm starts run one after the other by hand (block=1, then block=2); the
    report keeps both stages, the last one's rows, and the zeros from before the first."""
    import copy

    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    ids = _seeded_ids(8, 3)

    teacher = tiny_model("llama", num_hidden_layers=4).eval()
    student = swap_activation(tiny_model("llama", num_hidden_layers=4), "drelu")
    by_hand = copy.deepcopy(student)
    cpu, kw = torch.device("cpu"), {"seq_len": 32, "batch_tokens": 128}
    spec = dict(tokens=8 * 32, steps=20, lr=1e-2, l1=0.1)
    report = ffn_warmstart(student, teacher, _FixedMixture(ids), WarmstartSpec(**spec, block=[1, 2]), cpu, **kw)
    first = ffn_warmstart(by_hand, teacher, _FixedMixture(ids), WarmstartSpec(**spec, block=1), cpu, **kw)
    second = ffn_warmstart(by_hand, teacher, _FixedMixture(ids), WarmstartSpec(**spec, block=2), cpu, **kw)

    for k, v in by_hand.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    assert report["stages"] == [first, second]
    assert report["layers"] == second["layers"] and [r["layers"] for r in report["layers"]] == [[0, 1], [2, 3]]
    assert report["zeros_before"] == first["zeros_before"] and report["zeros_after"] == second["zeros_after"]
    # the second stage starts from the first stage's FFNs, not from the converted ones
    fresh = ffn_warmstart(
        swap_activation(tiny_model("llama", num_hidden_layers=4), "drelu"),
        teacher,
        _FixedMixture(ids),
        WarmstartSpec(**spec, block=2),
        cpu,
        **kw,
    )
    assert [r["mse_before"] for r in second["layers"]] != [r["mse_before"] for r in fresh["layers"]]


@pytest.mark.parametrize("block", [0, [], [1, 0]])
def test_warmstart_block_refuses_empty_or_zero(block):
    from pydantic import ValidationError

    from relufy.train.recipe import WarmstartSpec

    with pytest.raises(ValidationError, match="block"):
        WarmstartSpec(block=block)


def _pre_norm(model, ids):
    """The last decoder layer's output (the model without its final norm)."""
    import copy

    cut = copy.deepcopy(model)
    cut.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return cut.model(ids, use_cache=False).last_hidden_state


@pytest.mark.parametrize("family", ["mixtral", "gemma3_text"])
def test_block_warmstart_calls_layers_as_the_model_does(family):
    """Families whose layers take more than llama's (MoE blocks with routers; gemma3's sliding and
    global layers, each with its own mask and rotary embeddings): with the whole model as one block,
    the error before the fit is the whole student's against the teacher, each run by transformers."""
    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    ids = _seeded_ids(8, 2)

    shape = {"gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}}.get(family, {})
    teacher = tiny_model(family, **shape).eval()
    student = swap_activation(tiny_model(family, **shape), "drelu")
    want = float(F.mse_loss(_pre_norm(student, ids), _pre_norm(teacher, ids)))
    layers = student.config.num_hidden_layers
    spec = WarmstartSpec(tokens=8 * 32, steps=5, lr=1e-2, block=layers)
    report = ffn_warmstart(student, teacher, _FixedMixture(ids), spec, torch.device("cpu"), seq_len=32, batch_tokens=256)
    (row,) = report["layers"]
    assert row["layers"] == list(range(layers))
    assert row["mse_before"] == pytest.approx(want, rel=1e-5)
    assert row["mse_after"] < row["mse_before"]
