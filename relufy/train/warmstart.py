"""FFN-local warm start: before full training, fit each converted FFN to the original FFN's
outputs on the same hidden states, layer by layer (no backprop through the model).

The teacher (the original SwiGLU model) runs once over ``tokens`` training tokens (the ids of
``mixture.batch``, a ``relufy.train.mixture.Batch``; the labels are not used) while hooks
record the input and output of every layer's FFN block (the MoE block with its router for MoE
models). Then for each layer the student's FFN weights (router excluded) take ``steps`` Adam
steps on the mean squared error to the recorded outputs, on minibatches of recorded tokens.
With ``l1 > 0`` the fit also pays ``l1 x mean |combined activation|`` (ProSparse's penalty, per
layer): the plain fit trades zeros for accuracy (SmolLM2: 82% -> 77% zeros), the penalty holds
them. The report gives each layer's error and FFN zero fraction before and after.

Across processes (DDP or FSDP2, before the student is wrapped): every process runs the teacher
over as many sequences (a sharded teacher needs every process in each forward): the same ones for
in-memory sources, each process its own for streaming sources split across processes; it records and fits
only its share of the layers (layer ``i`` belongs to process ``i mod world``); each fitted FFN is
then broadcast from its owner to every process, and the report rows are gathered, so all
processes leave with the same student and report. Each layer's fit draws its minibatches from
its own generator (seeded with the layer index), so the numbers do not depend on how the layers
are split: they equal the one-process warm start's exactly when the teacher's forward does (same
kernels and thread counts; the tests allow 1e-5 relative for other reduction orders). More
processes make the fits, which dominate, faster.
Memory: 2 x tokens x hidden x (layers / processes) recordings, in the teacher's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..modeling.ffn import RelufyFFN


def _layers(model):
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError("no decoder layer list found")


def _ffn(mlp, x):
    """The FFN block on recorded tokens ``[N, H]``, as one sequence (MoE blocks take 3-D input)."""
    return mlp(x[None])[0]


def _measure(mlp, meter, layer: int, x, y) -> tuple[float, float]:
    """MSE to the recorded outputs and the layer's FFN zero fraction on ``x``."""
    meter.reset()
    with torch.no_grad():
        mse = float(F.mse_loss(_ffn(mlp, x), y))
    return mse, meter.fraction(layer)


def ffn_warmstart(
    student,
    teacher,
    mixture,
    spec,
    device,
    seq_len: int,
    batch_tokens: int = 1024,
    show_progress: bool = False,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Fit the student's FFNs to the teacher's, layer by layer; returns the report. With
    ``world > 1`` every process of the default process group calls it at once (see above)."""
    from torch.distributed.fsdp import FSDPModule

    from ..progress import token_progress

    n_seq = max(1, spec.tokens // seq_len)
    ids, _ = mixture.batch(n_seq)  # the labels are not needed: the fit is on FFN outputs
    t_layers, s_layers = _layers(teacher), _layers(student)
    mine = [i for i in range(len(s_layers)) if i % world == rank]
    inputs = {i: [] for i in mine}
    outputs = {i: [] for i in mine}

    def record(i):
        def hook(module, args, output):  # returns None: the output is left as it is
            inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            outputs[i].append(output.detach().reshape(-1, output.shape[-1]))

        return hook

    hooks = [t_layers[i].mlp.register_forward_hook(record(i)) for i in mine]
    if not isinstance(teacher, FSDPModule):  # a sharded teacher is placed by its sharding
        teacher.to(device)
    with token_progress() if show_progress else contextlib.nullcontext() as progress:
        if progress:
            record_task = progress.add_task("warm start: teacher pass", total=int(ids.numel()))
            fit_task = progress.add_task("warm start: layer fits", total=len(mine))
        with torch.no_grad():
            for row in ids:
                teacher(input_ids=row[None].to(device))
                if progress:
                    progress.advance(record_task, row.numel())
        for h in hooks:
            h.remove()

        def done(row):
            if progress:
                desc = f"warm start: layer {row['layer']} mse {row['mse_after']:.3g} zeros {row['zeros_after']:.1%}"
                progress.update(fit_task, advance=1, description=desc)

        rows = _fit_layers(student, s_layers, mine, inputs, outputs, spec, device, batch_tokens, done)
    if world > 1:
        rows = _share(s_layers, rows, device, world)
    n = max(1, len(rows))
    return {
        "tokens": int(ids.numel()),
        "layers": rows,
        "zeros_before": sum(r["zeros_before"] for r in rows) / n,
        "zeros_after": sum(r["zeros_after"] for r in rows) / n,
    }


def _ffn_params(mlp) -> list:
    """The parameters the fit trains: the swapped FFNs' (a router is not among them)."""
    return [p for m in mlp.modules() if isinstance(m, RelufyFFN) for p in m.parameters()]


def _share(s_layers, rows: list[dict], device, world: int) -> list[dict]:
    """Every fitted FFN broadcast from the process that fitted it; every process's report rows."""
    import torch.distributed as dist

    for i, layer in enumerate(s_layers):  # one layer on the device at a time (NCCL sends device tensors)
        home = _ffn_params(layer.mlp)[0].device
        for p in _ffn_params(layer.mlp.to(device)):
            dist.broadcast(p.data, src=i % world)
        layer.mlp.to(home)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return sorted((row for part in gathered for row in part), key=lambda row: row["layer"])


def _fit_layers(student, s_layers, mine, inputs, outputs, spec, device, batch_tokens, done) -> list[dict]:
    """Fit the student layers ``mine`` to the recorded teacher outputs; ``done(row)`` per layer.
    The training loop's sparsity meter counts zeros and carries the L1 terms; the FFNs' own
    observers are put back afterwards."""
    from ..measure.meter import SparsityMeter
    from ..measure.sites import ffn_sites

    sites = ffn_sites(student)
    meter = SparsityMeter(sites, l1=spec.l1 > 0)
    kept = [m.relufy_observer for _, m in sites]
    for _, m in sites:
        m.relufy_observer = meter
    rows = []
    try:
        for i in mine:
            home = _ffn_params(s_layers[i].mlp)[0].device  # back there after the fit: one FFN on the device at a time
            mlp = s_layers[i].mlp.to(device)
            dtype = _ffn_params(mlp)[0].dtype
            x, y = torch.cat(inputs.pop(i)).to(dtype), torch.cat(outputs.pop(i)).to(dtype)
            g = torch.Generator().manual_seed(i)  # per layer: the same draws however layers are split
            rows.append(_fit_layer(i, mlp, x, y, meter, spec, batch_tokens, g))
            mlp.to(home)
            done(rows[-1])
    finally:
        for (_, m), obs in zip(sites, kept, strict=True):
            m.relufy_observer = obs
    return rows


def _fit_layer(i, mlp, x, y, meter, spec, batch_tokens, g) -> dict:
    params = _ffn_params(mlp)
    opt = torch.optim.Adam(params, lr=spec.lr)
    mse_before, zeros_before = _measure(mlp, meter, i, x[:4096], y[:4096])
    for _ in range(spec.steps):
        idx = torch.randint(0, len(x), (min(batch_tokens, len(x)),), generator=g)
        meter.reset()
        loss = F.mse_loss(_ffn(mlp, x[idx]), y[idx])
        if meter.l1_terms:
            loss = loss + spec.l1 * torch.stack(meter.l1_terms).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mlp.zero_grad(set_to_none=True)  # no gradient of the fit (a router's included) may reach the first training step
    mse_after, zeros_after = _measure(mlp, meter, i, x[:4096], y[:4096])
    return {
        "layer": i,
        "mse_before": mse_before,
        "mse_after": mse_after,
        "zeros_before": zeros_before,
        "zeros_after": zeros_after,
    }
