"""The table of optimisers the conformance suite runs every generic check on.

Modelled on PyTorch's ``OptimizerInfo`` (``torch.testing._internal.common_optimizers``):
one :class:`Row` per optimiser configuration says how to group a list of parameters and
how to build the optimiser; ``test_optimizer_conformance.py`` runs each of its checks on
every row. A new optimiser gets every check by adding one row to :data:`ROWS`.

A row that fails a check today names it in ``known_failures`` with the reason (the issue
item that fixes it); :func:`cases` turns that into a strict ``xfail``, so the mark must be
removed in the commit that fixes it.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from secondorder.optim import MFAC, SOAP, SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

Groups = list[dict[str, Any]]


def one_group(params: list[torch.Tensor]) -> Groups:
    return [{"params": params}]


def low_rank_groups(params: list[torch.Tensor]) -> Groups:
    """Matrices in a group with ``rank`` (projected, or trained spectrally), the rest plain."""
    matrices = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    groups = [{"params": others}] if others else []
    if matrices:
        groups.append({"params": matrices, "rank": 2, "update_proj_gap": 2})
    return groups


@dataclass(frozen=True)
class Row:
    """One optimiser configuration: how it groups parameters and how it is built.

    Attributes:
        name: the test id.
        cls, settings: the optimiser is ``cls(groups, **settings)``.
        group: parameters → groups (matrices in a ``rank`` group for the low-rank family).
        complex_matrices: whether complex matrices are supported; if not, the constructor
            must refuse them (complex vectors must always work, as in ``torch.optim.AdamW``).
        fsdp2: whether it steps FSDP2-sharded parameters (SST runs under DDP only).
        known_failures: check name → reason, for the checks this row fails today.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    settings: Mapping[str, Any]
    group: Callable[[list[torch.Tensor]], Groups] = low_rank_groups
    complex_matrices: bool = False
    fsdp2: bool = True
    known_failures: Mapping[str, str] = field(default_factory=dict)

    def make(self, groups: Groups, **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(groups, **{**self.settings, **overrides})

    def build(self, params, **overrides: Any) -> torch.optim.Optimizer:
        return self.make(self.group(list(params)), **overrides)


#: What MFAC fails today (nothing: the marks of issue 11 were removed when it was fixed).
MFAC_FAILURES: dict[str, str] = {}

#: What the low-rank family fails today.
LOW_RANK_FAILURES: dict[str, str] = {}

#: SOAP's first basis holds the eigenvectors of one gradient's Gram, rank-deficient: those
#: of its null space are chosen by rounding (as in the authors' code), so a compiled
#: model's gradients, equal to the eager ones up to rounding, give another first basis and
#: a trajectory apart by more than the check's 1e-4 (docs/benchmarks.md, SOAP).
SOAP_FAILURES = {"compile": "SOAP's first basis is chosen by rounding in a null space"}

ROWS = [
    Row(
        "MFAC",
        MFAC,
        {"lr": 0.05, "num_grads": 4, "damp": 0.1, "momentum": 0.5, "prior": None},
        group=one_group,
        complex_matrices=True,
        known_failures=MFAC_FAILURES,
    ),
    Row(
        "MFAC-plain",  # the paper's M-FAC, without grafting
        MFAC,
        {"lr": 0.05, "num_grads": 4, "damp": 0.1, "momentum": 0.5, "graft": None},
        group=one_group,
        complex_matrices=True,
        known_failures=MFAC_FAILURES,
    ),
    Row(
        "MFAC-sparse",
        MFAC,
        {"lr": 0.05, "num_grads": 4, "damp": 0.1, "momentum": 0.5, "density": 0.3, "prior": None},
        group=one_group,
        complex_matrices=True,
        known_failures=MFAC_FAILURES,
    ),
    Row(
        "MFAC-prior",  # Adam's diagonal as the Fisher's prior
        MFAC,
        {"lr": 0.05, "num_grads": 4, "damp": 0.1, "prior": "adam"},
        group=one_group,
        complex_matrices=True,
        known_failures=MFAC_FAILURES,
    ),
    Row(
        "GaLoreAdamW",
        GaLoreAdamW,
        {"lr": 0.02, "weight_decay": 0.01},
        known_failures=LOW_RANK_FAILURES,
    ),
    Row(
        "NaturalGaLore",
        NaturalGaLore,
        {"lr": 0.02, "weight_decay": 0.01, "history": 3, "damp": 1e-3},
        known_failures=LOW_RANK_FAILURES,
    ),
    Row(
        "DCTAdamW",
        DCTAdamW,
        {"lr": 0.02, "weight_decay": 0.01},
        known_failures=LOW_RANK_FAILURES,
    ),
    Row(
        "SOAP",
        SOAP,
        {"lr": 0.02, "weight_decay": 0.01, "precondition_frequency": 2},
        group=one_group,
        complex_matrices=True,
        fsdp2=False,
        known_failures=SOAP_FAILURES,
    ),
    Row(
        "SOAP-rank",  # one-sided top-r eigenvectors (GaLore's memory)
        SOAP,
        {"lr": 0.02, "weight_decay": 0.01, "precondition_frequency": 2},
        complex_matrices=True,
        fsdp2=False,
    ),
    Row(
        "SOAP-dct",  # DCT-II columns chosen by the Gram's energy, no eigendecomposition
        SOAP,
        {"lr": 0.02, "weight_decay": 0.01, "precondition_frequency": 2, "basis": "dct"},
        group=one_group,
        complex_matrices=True,
        fsdp2=False,
    ),
    Row(
        "SST",
        SST,
        {"lr": 0.02, "weight_decay": 0.01, "uniform_mix": 0.5},
        fsdp2=False,
        known_failures=LOW_RANK_FAILURES,
    ),
]

#: The AdamW-core rows again, skipping non-finite steps on the device: their step counters
#: are device tensors and every write goes through ``torch.where`` (``nonfinite=
#: "skip_on_device"``), and every generic check must hold for that form of the state too.
ON_DEVICE = {"nonfinite": "skip_on_device"}
ROWS += [
    Row(f"{row.name}-skip_on_device", row.cls, {**row.settings, **ON_DEVICE}, row.group,
        row.complex_matrices, row.fsdp2, row.known_failures)
    for row in ROWS
    if row.cls is not MFAC
]  # fmt: skip


def cases(check: str, variants: Mapping[str, Any] | None = None) -> list[Any]:
    """``pytest.param``s of every row (and each of ``variants``, by id) for ``check``, with a
    strict xfail where the row is known to fail ``check`` or ``check:variant``."""
    params = []
    for row in ROWS:
        for variant_id, variant in (variants or {"": None}).items():
            reason = row.known_failures.get(f"{check}:{variant_id}") or row.known_failures.get(
                check
            )
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            values = (row,) if variants is None else (row, variant)
            name = f"{row.name}-{variant_id}" if variant_id else row.name
            params.append(pytest.param(*values, id=name, marks=marks))
    return params


# ------------------------------------------------------------------ the problem


def mlp(seed: int = 0, width: int = 6, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer MLP of a few dozen parameters: 4 → width → 3."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    inputs, targets = batch(step, next(model.parameters()).dtype)
    return nn.functional.cross_entropy(model(inputs).float(), targets)


def backward(model: nn.Module, step: int) -> torch.Tensor:
    loss = loss_of(model, step)
    loss.backward()
    return loss


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()


# ------------------------------------------------------------------ comparing


def round_trip(value: Any) -> Any:
    """``value`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights and the whole optimiser state, copied."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` hold the same structure and bit-identical tensors (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: {list(a)} vs {b!r}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name
