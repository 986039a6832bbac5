"""A curvature matrix is of one fixed function: the model's forward pass must not write to it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import NondeterminismError

__all__ = ["check_forward_keeps_buffers"]


def _written(copy: torch.Tensor, original: torch.Tensor) -> bool:
    # Batch norm's kernel updates its running statistics without bumping the version
    # counter, so the values are compared too.
    if copy._version > 0:
        return True
    if copy.is_floating_point() or copy.is_complex():
        return not torch.allclose(copy, original, rtol=0.0, atol=0.0, equal_nan=True)
    return not torch.equal(copy, original)


def check_forward_keeps_buffers(model: nn.Module, inputs: Any) -> None:
    """Raise :class:`NondeterminismError` if a forward pass on ``inputs`` writes to any of the
    model's buffers, as batch norm in train mode does to its running statistics.

    The pass runs on copies of the buffers, so the model is left as it was; a model
    without buffers is not run at all.
    """
    originals = dict(model.named_buffers())
    if not originals:
        return
    copies = {name: buffer.clone() for name, buffer in originals.items()}
    with torch.no_grad():
        functional_call(model, copies, (inputs,))
    written = [name for name, copy in copies.items() if _written(copy, originals[name])]
    if not written:
        return
    modules = sorted({type(model.get_submodule(n.rpartition(".")[0])).__name__ for n in written})
    shown = ", ".join(written[:4]) + (f" and {len(written) - 4} more" if len(written) > 4 else "")
    raise NondeterminismError(
        f"the model's forward pass writes to its buffers ({shown}, in {', '.join(modules)}): "
        "batch norm in train mode updates its running statistics, so every pass would be of "
        "another function. Call model.eval() before building the operator; nothing was changed"
    )
