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
