"""FFN-local warm start: before full training, fit each converted FFN to the original FFN's
outputs on the same hidden states, layer by layer (no backprop through the model).

The teacher (the original SwiGLU model) runs once over ``tokens`` training tokens while hooks
record the input and output of every layer's FFN block (the MoE block with its router for MoE
models). Then for each layer the student's FFN weights (router excluded) take ``steps`` Adam
steps on the mean squared error to the recorded outputs, on minibatches of recorded tokens.
Memory: 2 x tokens x hidden x layers floats of recordings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.ffn import RelufyFFN


def _layers(model):
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError("no decoder layer list found")


def ffn_warmstart(student, teacher, mixture, spec, device, seq_len: int, batch_tokens: int = 1024) -> dict:
    n_seq = max(1, spec.tokens // seq_len)
    batch = mixture.batch(n_seq)
    ids = batch[:, 0] if batch.dim() == 3 else batch  # chat data: (ids, labels) pairs
    t_layers, s_layers = _layers(teacher), _layers(student)
    inputs = [[] for _ in t_layers]
    outputs = [[] for _ in t_layers]

    def record(i):
        def hook(module, args, output):  # returns None: the output is left as it is
            inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            outputs[i].append(output.detach().reshape(-1, output.shape[-1]))

        return hook

    hooks = [layer.mlp.register_forward_hook(record(i)) for i, layer in enumerate(t_layers)]
    teacher.to(device)
    with torch.no_grad():
        for row in ids:
            teacher(input_ids=row[None].to(device))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    report = {"tokens": int(ids.numel()), "layers": []}
    for i, layer in enumerate(s_layers):
        x, y = torch.cat(inputs[i]), torch.cat(outputs[i])
        mlp = layer.mlp.to(device)
        params = [p for m in mlp.modules() if isinstance(m, RelufyFFN) for p in m.parameters()]
        opt = torch.optim.Adam(params, lr=spec.lr)
        with torch.no_grad():
            before = float(F.mse_loss(mlp(x[:4096]), y[:4096]))
        for _ in range(spec.steps):
            idx = torch.randint(0, len(x), (min(batch_tokens, len(x)),), generator=g)
            loss = F.mse_loss(mlp(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(F.mse_loss(mlp(x[:4096]), y[:4096]))
        report["layers"].append({"layer": i, "mse_before": before, "mse_after": after})
        inputs[i] = outputs[i] = None
    return report
