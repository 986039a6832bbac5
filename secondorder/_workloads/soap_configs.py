"""The configurations on which ``SOAP`` is compared with the authors' SOAP.

Shared by ``tests/test_soap_faithful.py`` (against the test's oracle) and
``benchmarks/soap_reference.py`` (against the authors' file); the benchmark's docstring
says why some configurations are not well posed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (4,)),
    "conv": (conv_net, (3, 6, 6)),
}

EVERY_KEYWORD = {
    "lr": 1e-2,
    "betas": (0.9, 0.99),
    "eps": 1e-6,
    "weight_decay": 0.1,
    "shampoo_beta": 0.9,
    "precondition_frequency": 5,
    "merge_dims": True,
    "max_precond_dim": 12,
    "normalize_grads": True,
    "correct_bias": False,
}


@dataclass(frozen=True)
class Configuration:
    """One comparison: a model of :data:`MODELS`, SOAP's keywords, the loss."""

    name: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    loss: str = "mse"
    well_posed: bool = True


CONFIGURATIONS = [
    Configuration("mlp-defaults", "mlp"),
    Configuration(
        "mlp-precondition_1d", "mlp", {"precondition_1d": True, "precondition_frequency": 20}
    ),
    Configuration("mlp-max_precond_dim-12", "mlp", {"max_precond_dim": 12}),
    Configuration("mlp-normalize_grads", "mlp", {"normalize_grads": True}),
    Configuration("mlp-no-correct_bias", "mlp", {"correct_bias": False}),
    Configuration("mlp-shampoo_beta-0.9", "mlp", {"shampoo_beta": 0.9}),
    Configuration("conv-defaults", "conv"),
    Configuration("conv-merge_dims-64", "conv", {"merge_dims": True, "max_precond_dim": 64}),
    Configuration("conv-merge_dims-12", "conv", {"merge_dims": True, "max_precond_dim": 12}),
    Configuration("conv-every-keyword", "conv", EVERY_KEYWORD),
    Configuration(
        "mlp-precondition_1d-every-10", "mlp", {"precondition_1d": True}, well_posed=False
    ),
    Configuration("conv-merge_dims-10000", "conv", {"merge_dims": True}, well_posed=False),
    Configuration("mlp-cross-entropy", "mlp", loss="cross_entropy", well_posed=False),
]


def _batches(
    configuration: Configuration, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    input_shape = MODELS[configuration.model][1]
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        inputs = torch.randn(32, *input_shape, generator=generator, dtype=dtype)
        if configuration.loss == "mse":
            targets = torch.randn(32, 3, generator=generator, dtype=dtype)
        else:
            targets = torch.randint(0, 3, (32,), generator=generator)
        batches.append((inputs, targets))
    return batches


def trajectory(
    configuration: Configuration,
    optimizer_class: Callable[..., Any],
    steps: int = 30,
    dtype: torch.dtype = torch.float32,
    noise: float = 0.0,
    first_too: bool = False,
) -> list[torch.Tensor]:
    """The parameters, flattened, before and after each of ``steps`` steps of
    ``optimizer_class(params, **configuration.settings)``; with ``noise``, every gradient
    after the first (with ``first_too``, every one) is multiplied by ``1 + noise · N(0, 1)``."""
    torch.manual_seed(0)
    model = MODELS[configuration.model][0]().to(dtype)
    loss_fn = getattr(nn.functional, configuration.loss.replace("mse", "mse_loss"))
    batches = _batches(configuration, dtype)
    optimizer = optimizer_class(model.parameters(), **configuration.settings)
    generator = torch.Generator().manual_seed(2)
    flat = [torch.cat([p.detach().reshape(-1) for p in model.parameters()])]
    for step in range(steps):
        inputs, targets = batches[step % len(batches)]
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        if noise and (step > 0 or first_too):
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(1 + noise * torch.randn(p.shape, generator=generator, dtype=dtype))
        optimizer.step()
        flat.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return flat
