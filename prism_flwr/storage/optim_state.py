"""Optimiser state <-> a flat ``{name: tensor}`` dict, so it can live in Flower's ``context.state``.

The paper's clients keep their Adam moments across rounds while the scores themselves are
replaced by the global ones each round; Flower keeps per-client state as arrays, so the state is
flattened to ``"<param index>.<field>"`` keys.
"""

from __future__ import annotations

import torch


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for idx, fields in opt.state_dict()["state"].items():
        for field, value in fields.items():
            out[f"{idx}.{field}"] = torch.as_tensor(value).detach().cpu().clone()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)  # moves moments to each parameter's device and dtype
