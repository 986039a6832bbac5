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
    params: dict[int, torch.Tensor] = {}  # the saved ids of the parameters
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        params.update(zip(saved_group["params"], group["params"], strict=True))
    for param_id, saved in state_dict["state"].items():
        if param_id in params:
            param = params[param_id]
            optimizer.state[param] = to_device(saved, param.device)


#: joins a state key to the rank whose rows it describes: ``"exp_avg@rank1"``
RANK_TAG = "@rank"


def tag_rank_local(state: dict[Any, dict[str, Any]], ranks: dict[Any, int]) -> dict[Any, Any]:
    """``state`` (a ``state_dict()``'s, by parameter id) with the keys of every parameter
    in ``ranks`` tagged with the rank that holds it: ``{index: {"exp_avg@rank1": ...}}``.

    Under FSDP2 each rank's state of a sharded parameter describes its own rows, in plain
    tensors. ``torch.distributed.checkpoint`` takes plain tensors under one name on every
    rank for replicas and keeps one of them; distinct names per rank keep them all, and
    each rank loads back its own (on the same number of ranks)."""
    return {
        index: (
            {f"{key}{RANK_TAG}{ranks[index]}": value for key, value in entries.items()}
            if index in ranks
            else entries
        )
        for index, entries in state.items()
    }


def untag_rank_local(state: dict[Any, Any], ranks: dict[Any, int]) -> dict[Any, Any]:
    """:func:`tag_rank_local` undone for this rank; ``ValueError`` for another rank's state.
    State saved without tags (before they existed) is returned as it is."""
    untagged = {}
    for index, entries in state.items():
        if not isinstance(entries, dict):
            untagged[index] = entries
            continue
        plain = {}
        for key, value in entries.items():
            name, tag, rank = key.rpartition(RANK_TAG) if isinstance(key, str) else ("", "", "")
            if not tag:
                plain[key] = value
                continue
            if index not in ranks or int(rank) != ranks[index]:
                mine = f"rank {ranks[index]}" if index in ranks else "an unsharded parameter"
                raise ValueError(
                    f"the state of parameter {index} was saved by rank {rank} of an FSDP2 run "
                    f"and is loaded by {mine}: resume on the same ranks (resharding is not "
                    "supported)"
                )
            plain[name] = value
        untagged[index] = plain
    return untagged
