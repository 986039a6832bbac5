"""Tiny float64 models and dense curvature matrices built without the code under test.

The oracles flatten the parameters into one vector ``θ`` and use ``jacrev`` /
``grad`` on explicit functions of ``θ``: no ``vmap`` over columns, no data loop
with weights, no per-sample ``vmap``. Hessians are ``jacrev(jacrev(f))``, what
``torch.func.hessian`` computes, without its forward-mode pass, whose first use
costs seconds of TorchScript compilation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

f64 = torch.float64
NUM_CLASSES = 3


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)).to(f64).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, NUM_CLASSES),
        )
        .to(f64)
        .eval()
    )


def hessian(f):
    return jacrev(jacrev(f))


MODELS = {"mlp": (tiny_mlp, (4,)), "cnn": (tiny_cnn, (1, 6, 6))}
LOSSES = {"cross_entropy": nn.functional.cross_entropy, "mse": nn.functional.mse_loss}


def make_data(
    input_shape: tuple[int, ...], loss: str, sizes=(3, 3, 1), seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the given sizes (an uneven last one by default)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    inputs = torch.randn(n, *input_shape, generator=gen, dtype=f64)
    if loss == "cross_entropy":
        targets = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    else:
        targets = torch.randn(n, NUM_CLASSES, generator=gen, dtype=f64)
    return list(zip(inputs.split(list(sizes)), targets.split(list(sizes)), strict=True))


class Flat:
    """The model as a function of one flat vector of the chosen parameters."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]) -> None:
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.model = model
        self.names = [name_of[id(p)] for p in params]
        self.shapes = [p.shape for p in params]
        self.theta = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        blocks = theta.split([s.numel() for s in self.shapes])
        named = {n: b.view(s) for n, b, s in zip(self.names, blocks, self.shapes, strict=True)}
        return functional_call(self.model, named, (inputs,))


def dense_hessian(model, loss_fn, params, data) -> torch.Tensor:
    """``∇²`` of the loss over all samples at once (one batch: no weighting to get wrong)."""
    flat = Flat(model, params)
    inputs = torch.cat([x for x, _ in data])
    targets = torch.cat([y for _, y in data])
    return hessian(lambda t: loss_fn(flat.outputs(t, inputs), targets))(flat.theta)


def dense_ggn(model, loss_fn, params, data) -> torch.Tensor:
    """``(1/N) Σ_i J_iᵀ H_i J_i`` sample by sample, ``H_i`` the output Hessian of ``ℓ_i``."""
    flat = Flat(model, params)
    total, count = 0.0, 0
    for inputs, targets in data:
        for x, y in zip(inputs, targets, strict=True):
            x, y = x[None], y[None]
            jacobian = jacrev(flat.outputs)(flat.theta, x).reshape(-1, flat.theta.numel())
            out = flat.outputs(flat.theta, x)
            h = hessian(lambda o, y=y: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
            total = total + jacobian.T @ h @ jacobian
            count += 1
    return total / count


def stacked_sample_gradients(model, loss_fn, params, data) -> torch.Tensor:
    """``[N, D]``: the gradient of each sample's loss, one ``grad`` call per sample."""
    flat = Flat(model, params)
    rows = []
    for inputs, targets in data:
        for x, y in zip(inputs, targets, strict=True):
            rows.append(
                grad(lambda t, x=x, y=y: loss_fn(flat.outputs(t, x[None]), y[None]))(flat.theta)
            )
    return torch.stack(rows)


def dense_empirical_fisher(model, loss_fn, params, data) -> torch.Tensor:
    g = stacked_sample_gradients(model, loss_fn, params, data)
    return g.T @ g / g.shape[0]


DENSE = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}


def decaying_matrix(
    dim: int, rate: float = 0.8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random symmetric PSD matrix with eigenvalues ``100 · rate^i`` and those eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=f64))
    eigenvalues = 100.0 * rate ** torch.arange(dim, dtype=f64)
    return (basis * eigenvalues) @ basis.T, eigenvalues
