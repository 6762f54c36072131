"""relufy train: recipes, exact resume after SIGKILL, NaN stop, final checkpoint, sparsity terms."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import trainkit
from tiny import corpus, save_tiny_with_tokenizer
from trainkit import train_single_threaded, write_recipe

import relufy
from relufy.errors import RelufyError
from relufy.train.loop import _kl, _kl_top_k, _teacher_top_k, lr_lambda, train
from relufy.train.recipe import load_recipe, validate

RECIPES = sorted(Path(__file__).parents[2].glob("recipes/*.yaml"))
ACCELERATE = Path(__file__).parents[2] / "recipes" / "accelerate"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "text.txt").write_text(corpus()[:60_000])
    save_tiny_with_tokenizer("llama", root / "llama")
    relufy.convert(root / "llama", root / "llama-drelu")
    save_tiny_with_tokenizer("qwen2_moe", root / "moe")
    return root


def recipe_dict(base, out, **overrides):
    """The recipe of these tests: 12 steps of 2 x 2 sequences, no checkpoints (``a__b=value`` overrides)."""
    defaults = {"optim__warmup_steps": 3, "budget__max_steps": 12, "budget__grad_accum": 2, "checkpoint": {"every": 0}}
    return trainkit.recipe_dict(base, out, **{**defaults, **overrides})


def losses(out):
    return [
        (r["step"], r["loss"], r["lr"], r["sparsity"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem.removesuffix("-cpu") or recipe.name.startswith(("turbosparse", "ablation", "smollm2"))
    assert recipe.optim.warmup_steps < (recipe.budget.max_steps or recipe.budget.max_tokens)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"optim__lr": -1}, "optim.lr"),
        ({"optim__learning_rate": 1e-4}, "optim.learning_rate: Extra inputs are not permitted"),
        ({"budget__max_tokens": 1000}, "exactly one of budget.max_steps and budget.max_tokens"),
        ({"optim__min_lr": 1.0}, "optim.min_lr"),
        ({"data__sources": []}, "data.sources"),
        ({"precision": "fp8"}, "precision"),
        ({"model__config": {"model_type": "llama"}}, "exactly one of model.path and model.config"),
    ],
)
def test_recipe_mistakes_name_the_field(base, tmp_path, change, needle, cli):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out", **change))
    with pytest.raises(RelufyError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(path)
    code, err, _ = cli("train", path, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and needle in err


def test_overrides(base, tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    recipe = load_recipe(path, ["optim.lr=2e-4", "budget.max_steps=7", "sparsity.distill.weight=0.5"])
    assert recipe.optim.lr == 2e-4 and recipe.budget.max_steps == 7 and recipe.sparsity.distill.weight == 0.5
    code, err, _ = cli("train", path, "optim.lr", "--dry-run")
    assert code == 2 and "key=value" in err


def test_lr_schedule():
    values = [lr_lambda(s, 10, 110, 1e-3, 1e-4) for s in range(0, 111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[110] == pytest.approx(0.1)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_kl_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, 4], [1, -100, -100, 2, 3]])
    mask = labels[:, 1:] != -100
    ps, pt = torch.softmax(s[:, :-1] / 2, -1)[mask], torch.softmax(t[:, :-1] / 2, -1)[mask]
    expected = (pt * (pt.log() - ps.log())).sum(-1).mean() * 4
    assert float(_kl(s, t, labels, 2.0)) == pytest.approx(float(expected), rel=1e-5)


def test_kl_top_k_is_the_kl_of_the_coarsened_distributions():
    """Top-k distillation: KL over the teacher's top k tokens plus one tail bucket. With k the
    vocabulary it is the full KL; below, the KL of both distributions with the rest merged into
    one outcome (never above the full KL); its gradient stays finite where the tail is empty."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7) * 3, torch.randn(2, 5, 7) * 3
    labels = torch.tensor([[1, 2, 3, -100, 4], [1, -100, -100, 2, 3]])
    full = _kl(s, t, labels, 2.0)
    assert float(_kl_top_k(s, _teacher_top_k(t, labels, 2.0, 7), labels, 2.0)) == pytest.approx(float(full), rel=1e-5)
    mask = labels[:, 1:] != -100
    ps, pt = torch.softmax(s[:, :-1] / 2, -1)[mask], torch.softmax(t[:, :-1] / 2, -1)[mask]
    top = pt.topk(3, -1).indices
    keep = torch.zeros_like(pt, dtype=torch.bool).scatter_(1, top, True)

    def coarse(p):
        return torch.cat([p.gather(1, top), (p * ~keep).sum(-1, keepdim=True)], -1)

    cp, cs = coarse(pt), coarse(ps)
    expected = (cp * (cp.log() - cs.log())).sum(-1).mean() * 4
    student = s.clone().requires_grad_(True)
    got = _kl_top_k(student, _teacher_top_k(t, labels, 2.0, 3), labels, 2.0)
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5) and float(got.detach()) <= float(full)
    got.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    peaked = torch.full((1, 3, 7), -1e4)
    peaked[..., 0] = 0.0  # all the teacher's mass on one token: an empty tail
    student, ones = torch.randn(1, 3, 7, requires_grad=True), torch.ones(1, 3, dtype=torch.long)
    loss = _kl_top_k(student, _teacher_top_k(peaked, ones, 1.0, 2), ones, 1.0)
    loss.backward()
    assert torch.isfinite(loss.detach()) and torch.isfinite(student.grad).all()


def test_resume_is_exact_after_sigkill(base, tmp_path):
    raw = recipe_dict(base, tmp_path / "a", budget__max_steps=300, checkpoint__every=30, checkpoint__keep_last=2)
    write_recipe(tmp_path / "a.yaml", raw)
    train(load_recipe(tmp_path / "a.yaml"), show_progress=False)
    raw["output_dir"] = str(tmp_path / "b")
    write_recipe(tmp_path / "b.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relufy", "train", str(tmp_path / "b.yaml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "b" / "checkpoints" / "step-00000060").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run finished before it was killed"
    killed_at = len(losses(tmp_path / "b"))
    assert 60 <= killed_at < 300
    train(load_recipe(tmp_path / "b.yaml"), resume=True, show_progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert len(list((tmp_path / "b" / "checkpoints").glob("step-*"))) == 2


def test_nan_stops_and_keeps_last_good_checkpoint(base, tmp_path, cli):
    raw = recipe_dict(
        base,
        tmp_path / "out",
        optim__lr=1e30,
        optim__min_lr=1e29,
        optim__warmup_steps=0,
        optim__grad_clip=None,
        checkpoint__every=1,
        budget__max_steps=20,
    )
    code, out, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    err = out.splitlines()[-1]  # before it: the progress display
    assert code == 2 and err.startswith("relufy: error:") and "Traceback" not in out, out
    assert re.search(r"loss became (nan|inf)", err), err
    assert "last good checkpoint" in err
    ckpts = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert ckpts and str(ckpts[-1]) in err
    assert not (tmp_path / "out" / "final").exists()


def test_final_checkpoint_is_convert_format(base, tmp_path):
    raw = recipe_dict(
        base,
        tmp_path / "out",
        sparsity={"l1": 0.01, "distill": {"weight": 0.5, "temperature": 2.0}, "ffn_warmstart": {"tokens": 1024, "steps": 30}},
    )
    raw["log"]["eval_every"] = 6
    final = train(validate(raw), show_progress=False)
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "relufy_llama" and config["relufy"]["activation"] == "drelu"
    assert (final / "modeling_relufy.py").exists() and (final / "tokenizer.json").exists()
    report = json.loads((tmp_path / "out" / "warmstart.json").read_text())
    assert all(row["mse_after"] < row["mse_before"] for row in report["layers"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "lr", "sparsity"} <= rows[0].keys()
    assert rows[5]["heldout_ppl"] > 1 and math.isfinite(rows[-1]["loss"])
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the trained weights load back through the converted-checkpoint path and changed
    trained, original = relufy.load(final), relufy.load(base / "llama-drelu")
    diff = max((a - b).abs().max() for a, b in zip(trained.parameters(), original.parameters(), strict=True))
    assert diff > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    script = Path(__file__).parents[1] / "remote_logits.py"
    (tmp_path / "jobs.json").write_text(json.dumps([{"path": str(final), "ids": ids.tolist(), "out": str(tmp_path / "r.pt")}]))
    subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], check=True, env={**os.environ, "PYTHONPATH": ""})
    remote = torch.load(tmp_path / "r.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], trained.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_l1_raises_sparsity(base, tmp_path):
    plain = train(validate(recipe_dict(base, tmp_path / "a", budget__max_steps=20)), show_progress=False)
    l1 = train(validate(recipe_dict(base, tmp_path / "b", budget__max_steps=20, sparsity={"l1": 5.0})), show_progress=False)
    assert losses(plain.parent)[-1][3] < losses(l1.parent)[-1][3]


def test_warmstart_l1_holds_zeros(capsys):
    """The per-layer fit with the L1 term ends with more FFN zeros than the plain fit, in every
    layer, and the report's before/after figures are the ones measured on the student."""
    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    class Mixture:  # the one method the warm start uses: (ids, labels), as relufy.train.mixture gives them
        def batch(self, n):
            ids = torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(1))
            return ids, ids

    teacher = tiny_model("llama").eval()
    reports, students = {}, {}
    for l1 in (0.0, 1.0):
        students[l1] = swap_activation(tiny_model("llama"), "drelu")
        spec = WarmstartSpec(tokens=512, steps=40, lr=1e-2, l1=l1)
        reports[l1] = ffn_warmstart(students[l1], teacher, Mixture(), spec, torch.device("cpu"), seq_len=32, show_progress=l1 > 0)
    plain, held = reports[0.0]["layers"], reports[1.0]["layers"]
    assert [r["zeros_before"] for r in plain] == [r["zeros_before"] for r in held]
    assert all(h["zeros_after"] > p["zeros_after"] for p, h in zip(plain, held, strict=True)), (plain, held)
    assert all(p["mse_after"] < p["mse_before"] for p in plain)
    assert reports[1.0]["zeros_after"] > reports[0.0]["zeros_after"]
    assert "warm start: layer" in capsys.readouterr().err  # the progress bar
    # the observers are put back: none was installed before
    assert all(getattr(m, "relufy_observer", None) is None for m in students[1.0].modules())


def test_warmstart_leaves_no_gradients():
    """The fits' gradients (the routers' included) must not reach the first training step: they
    did once, adding to its gradient in one process and under DDP, not under FSDP2."""
    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.mixture import Batch
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    class Mixture:
        def batch(self, n):
            return Batch.text(torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1)))

    student = swap_activation(tiny_model("qwen2_moe"), "drelu")
    spec = WarmstartSpec(tokens=64, steps=2, lr=1e-2)
    ffn_warmstart(student, tiny_model("qwen2_moe").eval(), Mixture(), spec, torch.device("cpu"), seq_len=16)
    assert [n for n, p in student.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_warmstart_fits_moe_blocks(family):
    """MoE blocks (routed experts, shared experts, a dense first layer for deepseek_v3) take the
    recorded tokens as one sequence; every layer's fit lowers its error."""
    from tiny import tiny_model

    from relufy.modeling.load import swap_activation
    from relufy.train.recipe import WarmstartSpec
    from relufy.train.warmstart import ffn_warmstart

    class Mixture:
        def batch(self, n):
            ids = torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(1))
            return ids, ids

    student = swap_activation(tiny_model(family), "drelu")
    spec = WarmstartSpec(tokens=512, steps=20, lr=1e-2, l1=1.0)
    report = ffn_warmstart(student, tiny_model(family).eval(), Mixture(), spec, torch.device("cpu"), seq_len=32)
    assert len(report["layers"]) == student.config.num_hidden_layers
    assert all(r["mse_after"] < r["mse_before"] and 0 < r["zeros_after"] < 1 for r in report["layers"]), report


def test_lora_is_merged(base, tmp_path):
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=4, lora={"r": 4, "alpha": 8})
    final = train(validate(raw), show_progress=False)
    from safetensors import safe_open

    with safe_open(final / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    model = relufy.load(final)
    assert any(
        (a - b).abs().max() > 0 for a, b in zip(model.parameters(), relufy.load(base / "llama-drelu").parameters(), strict=True)
    )


def test_moe_router_aux_coefficient_applies(base, tmp_path):
    """The coefficient reaches the loss: same data and seed, a larger coefficient, a larger loss."""
    first = {}
    for coef in (0.0, 5.0):
        raw = recipe_dict(
            base,
            tmp_path / f"out{coef}",
            budget__max_steps=4,
            model={"path": str(base / "moe"), "activation": "drelu"},
            sparsity={"router_aux_coef": coef},
        )
        final = train(validate(raw), show_progress=False)
        first[coef] = losses(tmp_path / f"out{coef}")[0][1]
    assert json.loads((final / "config.json").read_text())["model_type"] == "relufy_qwen2_moe"
    assert first[5.0] > first[0.0] + 1.0  # the aux loss is >= 1 (balanced routing) times the coefficient
    assert losses(tmp_path / "out5.0")[-1][3] > 0.3


def test_router_aux_refused_without_aux_loss(base, tmp_path):
    raw = recipe_dict(base, tmp_path / "out", sparsity={"router_aux_coef": 0.02})  # llama: no router
    with pytest.raises(RelufyError, match="router auxiliary loss"):
        train(validate(raw), show_progress=False)


def test_two_process_ddp_on_cpu(base, tmp_path):
    """Two gloo processes on CPU (torchrun + ACCELERATE_USE_CPU): each rank trains on its own slice
    of the global batch, the warm start splits its layers between the ranks, and the run matches
    one process with the same global batch: the warm start's figures and the loss curve within
    1e-5 relative (the gradient's all-reduce averages two halves where one process reduces the
    batch at once: last-bit differences, measured 1e-7)."""
    sparsity = {"l1": 0.01, "distill": {"weight": 0.5}, "ffn_warmstart": {"tokens": 512, "steps": 10}}
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=4, checkpoint__every=2, sparsity=sparsity)
    path = write_recipe(tmp_path / "r.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "relufy", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer
    assert rows[-1]["tokens"] == 4 * 2 * 2 * 32 * 2  # steps x micro-batch x accumulation x seq x processes
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert (tmp_path / "out" / "final" / "config.json").exists()
    one = recipe_dict(base, tmp_path / "one", budget__max_steps=4, budget__micro_batch_size=4, sparsity=sparsity)
    train_single_threaded(one)
    for a, b in zip(rows, map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"], (a, b)
    warm = [json.loads((tmp_path / out / "warmstart.json").read_text()) for out in ("out", "one")]
    assert len(warm[0]["layers"]) == 2
    for a, b in zip(warm[0]["layers"], warm[1]["layers"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_processes_accelerate_does_not_join_are_refused(base, tmp_path):
    """FSDP asked for on a machine without GPUs: Accelerate leaves each launched process alone
    (distributed type NO). Two independent runs would write one folder; relufy stops both."""
    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=2, optim__warmup_steps=1)  # a recipe that would run
    path = write_recipe(tmp_path / "r.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "relufy", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("relufy: error:")]
    assert errors and "2 processes were launched" in errors[0] and "FSDP" in errors[0], proc.stderr[-2000:]
    # no traceback from relufy's processes (torchrun prints its own for the failed children)
    out = proc.stdout + proc.stderr
    assert not re.search(r"^\[rank\d\]: Traceback", out, re.M) and "RelufyError" not in out
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "final").exists()


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant :{% endif %}"
)


def test_sft_loss_on_assistant_tokens_only(base, tmp_path):
    from transformers import AutoTokenizer

    from relufy.train.mixture import chat_example

    model_dir = tmp_path / "chat-model"
    import shutil

    shutil.copytree(base / "llama-drelu", model_dir)
    config = json.loads((model_dir / "config.json").read_text())  # room for the 160-token conversations
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    tok = AutoTokenizer.from_pretrained(model_dir, config=relufy.load(model_dir).config)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    convo = [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
    ids, labels = chat_example(convo, tok, 160)
    scored = tok.decode([i for i, label in zip(ids.tolist(), labels.tolist(), strict=True) if label != -100]).replace(" ", "")
    assert "Amutablesequence" in scored and "Animmutableone" in scored
    assert "list" not in scored and "tuple" not in scored and "user" not in scored
    assert (labels[ids == tok.pad_token_id] == -100).all()
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": convo}) for _ in range(40)))
    raw = recipe_dict(
        base,
        tmp_path / "out",
        budget__max_steps=4,
        model={"path": str(model_dir)},
        data={"sources": [{"data": str(tmp_path / "chat.jsonl")}], "seq_len": 160, "chat": True, "heldout_fraction": 0.1},
    )
    from relufy.train import mixture as train_mixture

    mixture, held = train_mixture.build(validate(raw).data, tok, seed=0)  # (ids, labels) pairs, like plain text
    batch_ids, batch_labels = mixture.batch(3)
    assert batch_ids.shape == batch_labels.shape == (3, 160) and len(held.ids) == len(held.labels) == 4
    assert torch.equal(batch_ids[0], ids) and torch.equal(batch_labels[0], labels) and torch.equal(held.labels[0], labels)
    final = train(validate(raw), show_progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert math.isfinite(summary["heldout_ppl"]) and (final / "config.json").exists()


def test_streaming_source_resumes_exactly(base, tmp_path):
    from transformers import AutoTokenizer

    from relufy.train import mixture as train_mixture
    from relufy.train.recipe import DataSpec

    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus()[:30_000].split("\n\n") if t))
    spec = DataSpec(
        sources=[
            {"data": str(tmp_path / "s.jsonl"), "streaming": True, "weight": 1.0},
            {"data": str(base / "text.txt"), "weight": 1.0},
        ],
        seq_len=32,
        heldout_sequences=3,
    )
    tok = AutoTokenizer.from_pretrained(base / "llama")
    first, held = train_mixture.build(spec, tok, seed=3)
    assert held.ids.shape[1] == 32 and len(held.ids) >= 3 and held.labels is held.ids  # plain text: labels are the ids
    for _ in range(7):
        first.batch(4)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    expected = [first.batch(4) for _ in range(5)]
    second, _ = train_mixture.build(spec, tok, seed=3)
    second.load_state_dict(state)
    for want in expected:
        got = second.batch(4)
        assert torch.equal(got.ids, want.ids) and got.labels is got.ids
    assert first.draws[0] > 0 and first.draws[1] > 0  # both sources drawn


def test_log_lines_without_a_terminal_and_tensorboard(base, tmp_path, cli):
    """Without a terminal ``relufy train`` prints one plain line per ``log.every`` steps (step,
    loss, lr, zeros, tokens/s, ETA) and no bar; ``log.trackers: [tensorboard]`` writes the same
    metrics as TensorBoard events (read back with TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = recipe_dict(base, tmp_path / "out", budget__max_steps=6, log__every=2, checkpoint__every=0)
    raw["log"]["trackers"] = ["tensorboard"]
    code, err, out = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    lines = [line for line in err.splitlines() if " step " in line]
    assert len(lines) == 3, err
    pattern = r"^t step (\d)/6 loss \d+\.\d{4} lr \d\.\d\de-\d\d zeros \d+\.\d% [\d,]+ tok/s ETA (\d+s|\d+m\d\ds)"
    assert [re.match(pattern, line).group(1) for line in lines] == ["2", "4", "6"], lines
    assert lines[-1].split("ETA ")[1].startswith("0s")
    logged = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [f"{r['loss']:.4f}" for r in logged] == [re.search(r"loss (\S+)", line).group(1) for line in lines]
    events = EventAccumulator(str(tmp_path / "out" / "t")).Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_tracker_is_one_line(base, tmp_path, cli):
    from safety import Snapshot, assert_refused

    raw = recipe_dict(base, tmp_path / "out")
    raw["log"]["trackers"] = ["wandb"]
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, "wandb is not installed", "relufy[wandb]")


@pytest.mark.parametrize("path", sorted(ACCELERATE.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    """Accelerate's own loader takes each shipped config; FSDP ones are FSDP2 (relufy refuses
    FSDP1) and launch as many processes as their machines hold, 8 GPUs each."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type.value in ("MULTI_GPU", "FSDP")
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.num_processes == 8 * config.num_machines
