"""Float64 reference computations the tests compare against."""

from __future__ import annotations

import torch


def empirical_fisher(G: torch.Tensor, damp: float) -> torch.Tensor:
    """``damp I + Gᵀ G / n`` as a dense float64 matrix."""
    G = G.to(torch.float64)
    n, d = G.shape
    return damp * torch.eye(d, dtype=torch.float64) + G.T @ G / n


def explicit_solve(G: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """``F⁻¹ x`` by a dense solve."""
    return torch.linalg.solve(empirical_fisher(G, damp), x.to(torch.float64))


def woodbury_solve(G: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """``F⁻¹ x = (x − Gᵀ (n λ I + G Gᵀ)⁻¹ G x) / λ``, the second, independent oracle."""
    G = G.to(torch.float64)
    x = x.to(torch.float64)
    n = G.shape[0]
    K = n * damp * torch.eye(n, dtype=torch.float64) + G @ G.T
    return (x - G.T @ torch.linalg.solve(K, G @ x)) / damp


def block_diagonal_inverse(G: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """Inverse of the block-diagonal part of ``F`` on consecutive blocks of ``block`` coordinates."""
    F = empirical_fisher(G, damp)
    inverse = torch.zeros_like(F)
    for start in range(0, F.shape[0], block):
        s = slice(start, start + block)
        inverse[s, s] = torch.linalg.inv(F[s, s])
    return inverse


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def efcp_steps(
    grads: torch.Tensor,
    num_grads: int,
    damp: float,
    k: int,
    *,
    error_feedback: bool = True,
    storage: torch.dtype = torch.float64,
    blocks: int = 1,
):
    """EFCP written out plainly, in float64: for each gradient, yield ``(c, e, u)``.

    ``a = e + g``; ``c`` keeps the ``k`` entries of largest ``|a|`` (ties to the lower
    coordinate, by a stable sort), rounded to ``storage``; ``e = a − c``; ``u`` is the
    explicit ``(damp I + Σ c_i c_iᵀ / n)⁻¹ c`` over the last ``num_grads`` ``c``'s. With
    ``blocks > 1`` the coordinates are cut into that many equal shards, each keeping its
    own top ``k`` (the shard-local selection of a distributed window)."""
    grads = grads.to(torch.float64)
    d = grads.shape[1]
    shard = d // blocks
    e = torch.zeros(d, dtype=torch.float64)
    held: list[torch.Tensor] = []
    for g in grads:
        a = e + g
        c = torch.zeros_like(a)
        for start in range(0, d, shard):
            part = a[start : start + shard]
            order = sorted(range(shard), key=lambda j, part=part: (-abs(float(part[j])), j))
            chosen = torch.tensor(order[:k]) + start
            c[chosen] = a[chosen].to(storage).to(torch.float64)
        if error_feedback:
            e = a - c
        held = [*held, c][-num_grads:]
        yield c, e.clone(), explicit_solve(torch.stack(held), damp, c)
