"""SOAP restated in plain PyTorch: the oracle the library's ``SOAP`` is tested against.

SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam") runs Adam in
the eigenbasis of Shampoo's preconditioner. For a parameter whose (possibly merged) shape
has dims ``n_0 … n_{d-1}``, every dim ``k`` with ``n_k <= max_precond_dim`` keeps a running
Gram ``C_k ← β C_k + (1 − β) G_(k) G_(k)ᵀ`` of the gradient unfolded along ``k`` and an
orthonormal basis ``Q_k`` of its eigenvectors (largest eigenvalue first). The step is Adam's
on ``G ×_k Q_kᵀ`` (the gradient rotated into that basis), rotated back by ``×_k Q_k``.

This module is written independently of the authors' code, from the semantics recorded for
issue 20 (the reference is github ``nikhilvyas/SOAP``, ``soap.py`` at commit ``a1e5535``).
Where rounding decides a discontinuous outcome it uses the same primitives as the reference:
the Gram by ``tensordot`` and ``lerp``, the eigenbasis by ``eigh`` of ``C + 1e-30 I`` in
float32, the refresh's sort by ``argsort`` of ``diag(Qᵀ C Q)``. A Gram of one gradient is
rank-deficient, so its null-space eigenvectors are fixed by rounding alone, and a different
but equal formula yields a different basis and a different trajectory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

Basis = torch.Tensor | None  # None: that dim of the working shape is left unrotated


def merged_shape(shape: Sequence[int], max_precond_dim: int) -> list[int]:
    """Consecutive dims multiplied together while their product stays ``<= max_precond_dim``.

    A dim that would push the running product past the limit closes it and starts the next
    one (a dim larger than the limit stands alone). A trailing run of ones is dropped, and a
    scalar becomes ``[1]``.
    """
    runs: list[int] = []
    current = 1
    for size in shape:
        if current > 1 and current * size > max_precond_dim:
            runs.append(current)  # the open run cannot take this dim: close it
            current = 1
        current *= size
        if current > max_precond_dim:  # a dim over the limit on its own
            runs.append(current)
            current = 1
    return [*runs, current] if current > 1 or not runs else runs


def mode_gram(grad: torch.Tensor, k: int) -> torch.Tensor:
    """``G_(k) G_(k)ᵀ``: the gradient contracted with itself over every dim but ``k``."""
    unfolded = grad.movedim(k, 0).reshape(grad.shape[k], -1)  # the mode-k unfolding
    return unfolded @ unfolded.T


def rotate(x: torch.Tensor, bases: Sequence[Basis], into_eigenbasis: bool) -> torch.Tensor:
    """``x ×_k Q_kᵀ`` for every dim with a basis (into), or ``x ×_k Q_k`` (back out)."""
    for k, basis in enumerate(bases):
        if basis is None:
            continue
        factor = basis if into_eigenbasis else basis.T
        x = torch.movedim(torch.movedim(x, k, -1) @ factor, -1, k)
    return x


def eigenbasis(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``gram`` as columns, largest eigenvalue first.

    As the reference, the Gram is rounded to float32 and ``1e-30 I`` (in the default dtype)
    is added before ``eigh``; the basis is returned in the Gram's dtype.
    """
    n = gram.shape[0]
    shifted = gram.to(torch.float32) + 1e-30 * torch.eye(n, dtype=torch.get_default_dtype())
    vectors = torch.linalg.eigh(shifted).eigenvectors
    return vectors.flip(1).to(gram.dtype)


def refreshed_bases(
    grams: Sequence[torch.Tensor | None], bases: Sequence[Basis], second: torch.Tensor
) -> tuple[list[Basis], torch.Tensor]:
    """One power iteration and a QR per dim, in float32: the new bases and ``second`` permuted.

    For each rotated dim ``k`` in order: the columns of the old basis are sorted by their
    Rayleigh quotients ``diag(Qᵀ C Q)`` (descending), ``second`` is permuted along ``k`` the
    same way, and the new basis is the Q factor of ``C Q_sorted``.
    """
    new_bases: list[Basis] = []
    for k, (gram, basis) in enumerate(zip(grams, bases, strict=True)):
        if gram is None or basis is None:
            new_bases.append(None)
            continue
        c32, q32 = gram.to(torch.float32), basis.to(torch.float32)
        rayleigh = torch.diag(q32.T @ c32 @ q32)
        order = torch.argsort(rayleigh, descending=True)
        second = second.index_select(k, order)
        q_factor = torch.linalg.qr(c32 @ q32[:, order]).Q
        new_bases.append(q_factor.to(basis.dtype))
    return new_bases, second


@dataclass
class _ParamState:
    """One parameter's SOAP state; the moments are kept in the eigenbasis, working shape."""

    shape: list[int]
    grams: list[torch.Tensor | None]
    bases: list[Basis] = field(default_factory=list)
    first: torch.Tensor | None = None
    second: torch.Tensor | None = None
    updates: int = 0


class SoapOracle:
    """SOAP on a list of parameters, one group, with the reference's keywords and defaults.

    ``step()`` reads ``p.grad`` of every parameter and updates it in place (parameters without
    a gradient are skipped). A parameter's first step only initialises its preconditioner.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
    ) -> None:
        self.params = list(params)
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.beta1, self.beta2 = betas
        self.gram_beta = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.frequency, self.max_dim = precondition_frequency, max_precond_dim
        self.merge, self.precondition_1d = merge_dims, precondition_1d
        self.normalize, self.correct_bias = normalize_grads, correct_bias
        self.states: dict[int, _ParamState] = {}

    def _new_state(self, p: torch.Tensor) -> _ParamState:
        shape = merged_shape(p.shape, self.max_dim) if self.merge else list(p.shape)
        if p.dim() == 1:
            rotated = [self.precondition_1d and p.shape[0] <= self.max_dim]
        else:
            rotated = [n <= self.max_dim for n in shape]
        grams = [p.new_zeros(n, n) if r else None for n, r in zip(shape, rotated, strict=True)]
        zeros = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return _ParamState(shape=shape, grams=grams, first=zeros, second=zeros.clone())

    def _accumulate_grams(self, state: _ParamState, grad: torch.Tensor) -> None:
        for k, gram in enumerate(state.grams):
            if gram is not None:
                gram.lerp_(mode_gram(grad, k), 1 - self.gram_beta)

    @torch.no_grad()
    def step(self) -> None:
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            if index not in self.states:  # first step: preconditioner only
                state = self.states[index] = self._new_state(p)
                self._accumulate_grams(state, p.grad.reshape(state.shape))
                state.bases = [None if c is None else eigenbasis(c) for c in state.grams]
                continue
            self._update(p, self.states[index])

    def _update(self, p: torch.Tensor, state: _ParamState) -> None:
        assert p.grad is not None and state.first is not None and state.second is not None
        grad = p.grad.reshape(state.shape)
        rotated_grad = rotate(grad, state.bases, into_eigenbasis=True)
        state.updates += 1
        t = state.updates
        state.first.mul_(self.beta1).add_(rotated_grad, alpha=1 - self.beta1)
        state.second.mul_(self.beta2).add_(rotated_grad.square(), alpha=1 - self.beta2)
        scale = self.lr
        if self.correct_bias:
            scale *= (1 - self.beta2**t) ** 0.5 / (1 - self.beta1**t)
        adam = state.first / (state.second.sqrt() + self.eps)
        direction = rotate(adam, state.bases, into_eigenbasis=False).reshape(p.shape)
        if self.normalize:
            direction = direction / (1e-30 + direction.square().mean().sqrt())
        p.add_(direction, alpha=-scale)
        if self.weight_decay > 0:
            p.add_(p, alpha=-self.lr * self.weight_decay)
        # the bases change after the step: the first moment goes out, the second is permuted
        first = rotate(state.first, state.bases, into_eigenbasis=False)
        self._accumulate_grams(state, grad)
        if t % self.frequency == 0:
            state.bases, state.second = refreshed_bases(state.grams, state.bases, state.second)
        state.first = rotate(first, state.bases, into_eigenbasis=True)
