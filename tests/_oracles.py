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


def top_k_compress(
    a: torch.Tensor,
    k: int | list[int],
    storage: torch.dtype = torch.float64,
    groups: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``a`` with all but its ``k`` entries of largest magnitude zeroed (ties to the lower
    coordinate, by a stable sort), the kept ones rounded to ``storage``. With ``groups``
    (lists of coordinates, e.g. the shards of distributed ranks) each group keeps its own
    top ``k`` (or ``k[i]`` for group ``i``)."""
    groups = [torch.arange(a.numel())] if groups is None else groups
    ks = [k] * len(groups) if isinstance(k, int) else k
    c = torch.zeros_like(a)
    for coordinates, kept in zip(groups, ks, strict=True):
        part = a[coordinates]
        order = sorted(range(len(part)), key=lambda j, part=part: (-abs(float(part[j])), j))
        chosen = coordinates[order[:kept]]
        c[chosen] = a[chosen].to(storage).to(a.dtype)
    return c


def even_shards(d: int, count: int) -> list[torch.Tensor]:
    """The coordinates of ``count`` equal consecutive shards of ``d``."""
    size = d // count
    return [torch.arange(start, start + size) for start in range(0, d, size)]


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

    ``a = e + g``; ``c`` = :func:`top_k_compress` of ``a`` (in ``blocks`` equal shards);
    ``e = a − c``; ``u`` is the explicit ``(damp I + Σ c_i c_iᵀ / n)⁻¹ c`` over the last
    ``num_grads`` ``c``'s."""
    e = torch.zeros(grads.shape[1], dtype=torch.float64)
    held: list[torch.Tensor] = []
    for g in grads.to(torch.float64):
        a = e + g
        c = top_k_compress(a, k, storage, even_shards(a.numel(), blocks))
        if error_feedback:
            e = a - c
        held = [*held, c][-num_grads:]
        yield c, e.clone(), explicit_solve(torch.stack(held), damp, c)
