"""Loading optimiser state without torch's dtype cast.

``torch.optim.Optimizer.load_state_dict`` casts every tensor in a parameter's
state (nested dicts included, integer tensors too) to that parameter's dtype.
Our optimisers keep float32 or float64 statistics for bf16 parameters, float64
small systems and int64 index tensors, so that cast would change them and
break bit-identical resumption. :func:`load_state_dict_exactly` loads as torch
does, then puts back every state tensor in the dtype it was saved with.
"""

from __future__ import annotations

from typing import Any

import torch

from .._common import to_device


def load_state_dict_exactly(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """``torch.optim.Optimizer.load_state_dict``, keeping every state tensor's saved dtype."""
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    params = {}
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        params.update(zip(saved_group["params"], group["params"], strict=True))
    for param_id, saved in state_dict["state"].items():
        if param_id in params:
            param = params[param_id]
            optimizer.state[param] = to_device(saved, param.device)
