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

With ``block = K > 1`` the fit is on blocks of K decoder layers instead: each block starts from
the teacher's hidden state at its first layer and its FFNs are fitted (Adam on the squared error of
the block's output to the teacher's, whole sequences per step) so that the error one FFN leaves
is corrected by the next ones in the block rather than compounded. The student's layers are
called alone with the arguments the teacher's layers received on their first call (position
embeddings, attention mask), recorded by hooks, as quantizers such as GPTQ do: no family-specific
code. The report then has one row per block (``layers`` lists them).

``block`` may list stages, run one after the other on the same tokens, each with ``steps``,
``lr`` and ``l1``: ``[1, 5]`` fits each FFN alone, then blocks of 5 from there (the per-FFN fit
holds the zeros, the block fit then corrects what compounds). The report is the last stage's,
with ``zeros_before`` from before the first and every stage's report under ``stages``.

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
Memory: 2 x tokens x hidden x (layers / processes) recordings, in the teacher's dtype (blocks:
2 x tokens x hidden x (blocks / processes)).
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
    ``world > 1`` every process of the default process group calls it at once (see above). With
    ``spec.block`` a list, the stages run one after the other on the same tokens."""
    n_seq = max(1, spec.tokens // seq_len)
    ids, _ = mixture.batch(n_seq)  # the labels are not needed: the fit is on FFN outputs
    reports = []
    for k in spec.stages:
        fit = _block_warmstart if k > 1 else _ffn_warmstart
        reports.append(fit(student, teacher, ids, spec, k, device, batch_tokens, show_progress, rank, world))
    if len(reports) == 1:
        return reports[0]
    # stages: the last stage's rows, zeros from before the first stage to after the last
    return {**reports[-1], "zeros_before": reports[0]["zeros_before"], "stages": reports}


def _ffn_warmstart(student, teacher, ids, spec, size, device, batch_tokens, show_progress, rank, world) -> dict:
    """Each FFN alone (``size`` 1), on the teacher FFN's recorded inputs and outputs."""
    from torch.distributed.fsdp import FSDPModule

    from ..progress import token_progress

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
    return _report(ids, rows)


def _report(ids, rows: list[dict]) -> dict:
    """The report: the rows (one per layer, or per block of layers) and the zeros over all layers."""
    n = [len(r.get("layers", [r["layer"]])) for r in rows]
    total = max(1, sum(n))
    return {
        "tokens": int(ids.numel()),
        "layers": rows,
        "zeros_before": sum(r["zeros_before"] * k for r, k in zip(rows, n, strict=True)) / total,
        "zeros_after": sum(r["zeros_after"] * k for r, k in zip(rows, n, strict=True)) / total,
    }


def _ffn_params(mlp) -> list:
    """The parameters the fit trains: the swapped FFNs' (a router is not among them)."""
    return [p for m in mlp.modules() if isinstance(m, RelufyFFN) for p in m.parameters()]


def _share(s_layers, rows: list[dict], device, world: int, block: int = 1) -> list[dict]:
    """Every fitted FFN broadcast from the process that fitted it (layer ``i`` belongs to block
    ``i // block``, block ``j`` to process ``j mod world``); every process's report rows."""
    import torch.distributed as dist

    for i, layer in enumerate(s_layers):  # one layer on the device at a time (NCCL sends device tensors)
        home = _ffn_params(layer.mlp)[0].device
        for p in _ffn_params(layer.mlp.to(device)):
            dist.broadcast(p.data, src=(i // block) % world)
        layer.mlp.to(home)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return sorted((row for part in gathered for row in part), key=lambda row: row["layer"])


@contextlib.contextmanager
def _metered(student, l1: bool):
    """The training loop's sparsity meter on every FFN of ``student`` for the fits (it counts the
    zeros and carries the L1 terms); the FFNs' own observers are put back afterwards."""
    from ..measure.meter import SparsityMeter
    from ..measure.sites import ffn_sites

    sites = ffn_sites(student)
    meter = SparsityMeter(sites, l1=l1)
    kept = [m.relufy_observer for _, m in sites]
    for _, m in sites:
        m.relufy_observer = meter
    try:
        yield meter
    finally:
        for (_, m), obs in zip(sites, kept, strict=True):
            m.relufy_observer = obs


def _fit_layers(student, s_layers, mine, inputs, outputs, spec, device, batch_tokens, done) -> list[dict]:
    """Fit the student layers ``mine`` to the recorded teacher outputs; ``done(row)`` per layer."""
    rows = []
    with _metered(student, spec.l1 > 0) as meter:
        for i in mine:
            home = _ffn_params(s_layers[i].mlp)[0].device  # back there after the fit: one FFN on the device at a time
            mlp = s_layers[i].mlp.to(device)
            dtype = _ffn_params(mlp)[0].dtype
            x, y = torch.cat(inputs.pop(i)).to(dtype), torch.cat(outputs.pop(i)).to(dtype)
            g = torch.Generator().manual_seed(i)  # per layer: the same draws however layers are split
            rows.append(_fit_layer(i, mlp, x, y, meter, spec, batch_tokens, g))
            mlp.to(home)
            done(rows[-1])
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


# --- blocks of layers (a stage's size > 1) -------------------------------------------------------


def _split_call(args, kwargs) -> tuple:
    """A decoder layer's call as (hidden states, the other positional arguments, the keywords)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _hidden(output):
    """A decoder layer's output hidden states (some families return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _cast(obj, device, dtype):
    """The recorded call's tensors on ``device``, floating ones in ``dtype`` (masks and positions as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, device, dtype) for k, v in obj.items()}
    return obj


def _block_warmstart(student, teacher, ids, spec, size, device, batch_tokens, show_progress, rank, world) -> dict:
    """Blocks of ``size`` decoder layers, each fitted from the teacher's hidden state at its
    first layer to the teacher's output of its last layer. The teacher runs over the sequences in
    batches of ``batch_tokens // seq_len`` (at least one) sequences; hooks record, per block of this
    process, the hidden states entering its first layer and leaving its last one, and, per layer,
    the rest of its first call (position embeddings, attention mask, ...), so that the student's
    layers can be called alone exactly as the model calls them. Every fit step then runs the
    student's block on a batch of that many recorded sequences (drawn by a generator seeded with the
    block's first layer) and takes an Adam step on its FFN weights."""
    from torch.distributed.fsdp import FSDPModule

    from ..progress import token_progress

    t_layers, s_layers = _layers(teacher), _layers(student)
    n_seq = ids.shape[0]
    per_batch = min(n_seq, max(1, batch_tokens // ids.shape[1]))
    blocks = [list(range(s, min(s + size, len(s_layers)))) for s in range(0, len(s_layers), size)]
    mine = [b for j, b in enumerate(blocks) if j % world == rank]
    first = {b[0] for b in mine}
    last = {b[-1]: b[0] for b in mine}
    inputs = {s: [] for s in first}
    outputs = {s: [] for s in first}
    calls: dict[int, tuple] = {}

    def before(i):
        def hook(module, args, kwargs):  # returns None: the call goes on as it is
            h, rest, kw = _split_call(args, kwargs)
            calls.setdefault(i, (rest, kw))
            if i in first:
                inputs[i].append(h.detach())

        return hook

    def after(i):
        def hook(module, args, output):
            outputs[last[i]].append(_hidden(output).detach())

        return hook

    hooks = [t_layers[i].register_forward_pre_hook(before(i), with_kwargs=True) for b in mine for i in b]
    hooks += [t_layers[i].register_forward_hook(after(i)) for i in last]
    if not isinstance(teacher, FSDPModule):
        teacher.to(device)
    rows = []
    with token_progress() if show_progress else contextlib.nullcontext() as progress:
        if progress:
            record_task = progress.add_task("warm start: teacher pass", total=int(ids.numel()))
            fit_task = progress.add_task("warm start: block fits", total=len(mine))
        with torch.no_grad():
            for a in range(0, n_seq, per_batch):
                teacher(input_ids=ids[a : a + per_batch].to(device), use_cache=False)
                if progress:
                    progress.advance(record_task, ids[a : a + per_batch].numel())
        for h in hooks:
            h.remove()
        with _metered(student, spec.l1 > 0) as meter:
            for block in mine:
                s = block[0]
                home = _ffn_params(s_layers[s].mlp)[0].device
                layers = [s_layers[i].to(device) for i in block]
                dtype = _ffn_params(layers[0].mlp)[0].dtype
                x, y = torch.cat(inputs.pop(s)).to(dtype), torch.cat(outputs.pop(s)).to(dtype)
                block_calls = [_cast(calls[i], device, dtype) for i in block]
                rows.append(_fit_block(block, layers, block_calls, x, y, meter, spec, per_batch))
                for layer in layers:
                    layer.to(home)
                if progress:
                    row = rows[-1]
                    desc = f"warm start: layers {s}-{block[-1]} mse {row['mse_after']:.3g} zeros {row['zeros_after']:.1%}"
                    progress.update(fit_task, advance=1, description=desc)
    if world > 1:
        rows = _share(s_layers, rows, device, world, size)
    return _report(ids, rows)


def _run_block(layers, calls, h):
    for layer, (rest, kw) in zip(layers, calls, strict=True):
        h = _hidden(layer(h, *rest, **kw))
    return h


def _fit_block(block, layers, calls, x, y, meter, spec, per_batch) -> dict:
    """Adam on the block's FFN weights: squared error of its output to the teacher's, plus
    ``l1`` x the mean L1 term x the block's layer count (each layer's penalty as in a one-layer fit)."""
    params = [p for layer in layers for p in _ffn_params(layer.mlp)]
    trained = {id(p) for p in params}
    frozen = [p for layer in layers for p in layer.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:  # gradients flow through attention to the earlier FFNs; its weights need none
        p.requires_grad_(False)
    try:
        return _fit_block_params(block, layers, calls, x, y, meter, spec, per_batch, params)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _fit_block_params(block, layers, calls, x, y, meter, spec, per_batch, params) -> dict:
    opt = torch.optim.Adam(params, lr=spec.lr)
    g = torch.Generator().manual_seed(block[0])  # per block: the same draws however blocks are split
    n_measure = per_batch * max(1, min(len(x), max(1, 4096 // x.shape[1])) // per_batch)

    def measure() -> tuple[float, float]:
        meter.reset()
        with torch.no_grad():
            err = [
                F.mse_loss(_run_block(layers, calls, x[a : a + per_batch]), y[a : a + per_batch], reduction="sum")
                for a in range(0, n_measure, per_batch)
            ]
        mse = float(sum(err)) / y[:n_measure].numel()
        return mse, sum(meter.fraction(i) for i in block) / len(block)

    mse_before, zeros_before = measure()
    for _ in range(spec.steps):
        idx = torch.randint(0, len(x), (per_batch,), generator=g)
        meter.reset()
        loss = F.mse_loss(_run_block(layers, calls, x[idx]), y[idx])
        if meter.l1_terms:
            loss = loss + spec.l1 * len(block) * torch.stack(meter.l1_terms).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for layer in layers:  # no gradient of the fit (attention's and a router's included) may reach training
        layer.zero_grad(set_to_none=True)
    mse_after, zeros_after = measure()
    return {
        "layer": block[0],
        "layers": block,
        "mse_before": mse_before,
        "mse_after": mse_after,
        "zeros_before": zeros_before,
        "zeros_after": zeros_after,
    }
