r"""Pruners: magnitude (the baseline) and Optimal Brain Surgeon on the M-FAC inverse Fisher.

Both remove the weights of lowest score, globally or layer by layer, to an
unstructured sparsity or an N:M pattern, in one or several steps. They differ in
the score and in what happens to the weights that stay: magnitude pruning
leaves them alone, OBS moves them to compensate (:mod:`.obs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._checks import check_finite, check_positive_int, ensure_fits
from .._common import to_device
from .._progress import progress
from ..curvature.mfac import DenseMFAC
from .block_obs import block_inverse_fisher, remove_jointly, to_blocks
from .masks import count_to_prune, prune_lowest, prune_n_m
from .obs import obs_saliency, obs_update, relative_damping
from .targets import ParamSpec, PruneTarget, resolve_targets

__all__ = ["MFACPruner", "MagnitudePruner", "Pruner"]

Scope = Literal["global", "layer"]
Removal = Literal["sum", "joint"]
# Maps which alive weights to remove (a boolean over them) to their new values.
Update = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Goal:
    """One pruning step: an unstructured sparsity, or at most ``n`` weights in each group of ``m``."""

    sparsity: float | None = None
    n: int = 0
    m: int = 0


class Pruner:
    """Removes the weights of lowest score in steps; subclasses define the score in :meth:`_score`.

    Masks live in the model as ``torch.nn.utils.prune`` keeps them (see
    :mod:`.targets`): weights already pruned stay pruned and take no further
    part, so pruning in several calls (gradual pruning) composes, and masks made
    by ``torch.nn.utils.prune`` are respected.

    Args:
        model: the model; pruned in place.
        params: the weights to prune: ``None`` for every weight of two or more
            dimensions (no biases or norms), or the parameters themselves (as an
            optimiser takes them), their names, or ``(module, name)`` pairs.
        scope: ``"global"`` ranks all weights together; ``"layer"`` brings
            every weight tensor to the same sparsity.
    """

    default_recompute_steps = 1

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[ParamSpec] | None = None,
        *,
        scope: Scope = "global",
    ) -> None:
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.model = model
        self.scope = scope
        self.targets: list[PruneTarget] = resolve_targets(model, params)
        double = all(t.parameter.dtype == torch.float64 for t in self.targets)
        self._dtype = torch.float64 if double else torch.float32
        self.device = self.targets[0].parameter.device

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights removed so far."""
        total = sum(t.parameter.numel() for t in self.targets)
        return sum(int((~t.mask()).sum()) for t in self.targets) / total

    def masks(self) -> dict[str, torch.Tensor]:
        """The boolean mask of each weight tensor (``True``: kept), by qualified name."""
        return {t.qualname: t.mask() for t in self.targets}

    def prune(
        self,
        sparsity: float | None = None,
        *,
        n_m: tuple[int, int] | None = None,
        recompute_steps: int | None = None,
    ) -> float:
        """Prune to ``sparsity`` (a fraction of the prunable weights), or to the pattern ``n_m``.

        Args:
            sparsity: target fraction of zeros, at least the current one, below 1.
                The nearest whole count is removed, but every weight tensor keeps at
                least one weight (a layer with none disconnects the network), so
                close to 1 the sparsity reached is lower: at most ``1 − T / N`` for
                ``T`` tensors of ``N`` weights.
            n_m: ``(n, m)`` for semi-structured sparsity: at most ``n`` weights kept
                in every group of ``m`` consecutive weights along a row of
                ``weight.reshape(out_features, -1)`` (``(2, 4)``: the pattern of
                sparse tensor cores). Every row length must be a multiple of ``m``.
                ``n`` counts the weights *kept*: the SparseGPT and Wanda reference
                code's ``prunen``/``prunem`` count those removed (their ``prunen=2,
                prunem=4`` is ``n_m=(2, 4)`` only because half go; their
                ``prunen=1, prunem=4`` is ``n_m=(3, 4)``).
            recompute_steps: number of steps; each removes the same fraction of
                the remaining weights (for N:M, lowers ``m → n`` evenly) and
                re-scores. Defaults to the class's ``default_recompute_steps``.

        Returns the sparsity reached. On any error (bad data, NaN gradients,
        memory) the model is restored to what it was before the call.
        """
        steps = check_positive_int(
            self.default_recompute_steps if recompute_steps is None else recompute_steps,
            "recompute_steps",
        )
        goals = self._plan(sparsity, n_m, steps)
        saved = [target.snapshot() for target in self.targets]
        try:
            for goal in goals:
                self._prune_step(goal)
        except BaseException:
            for target, state in zip(self.targets, saved, strict=True):
                target.restore(state)
            raise
        return self.sparsity

    def make_permanent(self) -> list[str]:
        """Make the masks of the pruned weights permanent (``torch.nn.utils.prune.remove``).

        Call it once pruning is done and before saving the model: each weight
        becomes a plain parameter again, zero where pruned, and ``state_dict()``
        or ``save_pretrained`` store it under its usual name (see
        :func:`~.targets.remove_masks`). Returns the names of the weights made
        permanent. Fine-tuning afterwards no longer keeps the pruned weights at zero.
        """
        made = []
        for target in self.targets:
            if target.is_reparametrized:
                torch_prune.remove(target.module, target.name)
                made.append(target.qualname)
        return made

    def _score(self, weights: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, Update]:
        """Scores of the alive ``weights`` (lowest removed first) and how the kept ones change.

        ``weights`` holds the alive weights only, in the order of the boolean
        ``alive`` over all prunable weights.
        """
        raise NotImplementedError

    def _plan(self, sparsity: float | None, n_m: tuple[int, int] | None, steps: int) -> list[_Goal]:
        if (sparsity is None) == (n_m is None):
            raise ValueError("give exactly one of sparsity and n_m")
        if n_m is not None:
            n, m = n_m
            if (
                not all(isinstance(k, int) and not isinstance(k, bool) for k in n_m)
                or not 1 <= n < m
            ):
                raise ValueError(f"n_m must be (n, m) with 1 <= n < m, got {n_m!r}")
            for target in self.targets:
                shape = target.parameter.shape
                if target.parameter.dim() < 2 or (target.parameter.numel() // shape[0]) % m:
                    raise ValueError(
                        f"{target.qualname} of shape {tuple(shape)} has rows that cannot be cut "
                        f"into groups of {m}"
                    )
            steps = min(steps, m - n)
            return [_Goal(n=m - math.ceil(j * (m - n) / steps), m=m) for j in range(1, steps + 1)]
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        total = sum(t.parameter.numel() for t in self.targets)
        pruned = sum(int((~t.mask()).sum()) for t in self.targets)
        if count_to_prune(sparsity, total, 0) < pruned:
            raise ValueError(
                f"the weights are already {pruned / total:.4f} sparse; pruned weights stay "
                f"pruned, so the sparsity cannot go down to {sparsity}"
            )
        current = pruned / total
        # Equal fractions of the remaining weights: densities in geometric progression.
        ratio = (1 - sparsity) / (1 - current)
        goals = [_Goal(sparsity=1 - (1 - current) * ratio ** (j / steps)) for j in range(1, steps)]
        return [*goals, _Goal(sparsity=sparsity)]

    def _prune_step(self, goal: _Goal) -> None:
        shapes = [t.parameter.shape for t in self.targets]
        sizes = [t.parameter.numel() for t in self.targets]
        alive = torch.cat([t.mask().flatten() for t in self.targets])
        if not self._select(goal, torch.zeros(alive.shape, device=self.device), alive).any():
            return  # nothing to remove: save the scoring (for M-FAC, the gradients)
        weights = torch.cat([t.weight().flatten().to(self._dtype) for t in self.targets])
        alive_weights = weights[alive]
        scores, update = self._score(alive_weights, alive)
        all_scores = torch.full_like(weights, math.inf)
        all_scores[alive] = scores.to(self._dtype)
        removed = self._select(goal, all_scores, alive)
        weights[alive] = update(removed[alive])
        kept = alive & ~removed
        for target, shape, w, k in zip(
            self.targets, shapes, weights.split(sizes), kept.split(sizes), strict=True
        ):
            target.assign(w.reshape(shape).to(target.parameter.dtype), k.reshape(shape))

    def _select(self, goal: _Goal, scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """The alive weights to remove for ``goal``, as a boolean over all prunable weights."""
        sizes = [t.parameter.numel() for t in self.targets]
        if goal.sparsity is not None and self.scope == "global":
            # Every tensor keeps its best alive weight: a global ranking may otherwise
            # empty a layer (and disconnect the network) at a sparsity below 1.
            candidates = alive & ~_best_of_each(scores, alive, sizes)
            pruned = int((~alive).sum())
            count = count_to_prune(goal.sparsity, alive.numel(), pruned)
            return prune_lowest(scores, candidates, min(count, int(candidates.sum())))
        parts = []
        for target, s, a in zip(self.targets, scores.split(sizes), alive.split(sizes), strict=True):
            if goal.sparsity is None:
                rows = target.parameter.shape[0]
                parts.append(prune_n_m(s.reshape(rows, -1), a.reshape(rows, -1), goal.n, goal.m))
            else:
                count = count_to_prune(goal.sparsity, a.numel(), int((~a).sum()))
                parts.append(prune_lowest(s, a, count))
        return torch.cat([part.flatten() for part in parts])


class MagnitudePruner(Pruner):
    """The baseline: remove the weights of smallest magnitude; the others stay as they are.

    Global magnitude pruning is ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured``; this adds the per-layer and N:M options and the same
    interface as :class:`MFACPruner`. Steps change nothing: scores do not move.
    """

    def _score(self, weights: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, Update]:
        return weights.abs(), lambda removed: weights.masked_fill(removed, 0)


class MFACPruner(Pruner):
    r"""Optimal Brain Surgeon on the blockwise M-FAC inverse of the empirical Fisher.

    Each step draws exactly ``num_grads`` mini-batches from ``data``, one
    gradient each, of the loss with respect to the weights still alive (the
    model in eval mode, its ``.grad`` untouched), and forms

    .. math:: F = \lambda I + \tfrac{1}{n} \textstyle\sum_i g_i g_i^\top

    on those coordinates, block-diagonally on consecutive blocks of
    ``block_size`` (:class:`~secondorder.curvature.DenseMFAC`). It scores every
    alive weight by ``ρ_q = w_q² / (2 [F⁻¹]_qq)``, removes the lowest and moves
    the others by ``δw = −Σ_q (w_q / [F⁻¹]_qq) F⁻¹ e_q`` (:mod:`.obs`).

    The damping is ``λ = damp + relative_damp · mean_k [(1/n) Σ_i g_ik²]``, by
    default 1% of the mean diagonal of the Fisher estimate (SparseGPT's percentage
    damping). The scale of a trained model's gradients varies by orders of
    magnitude (175x between the two digits models of the benchmark), and with
    it the right absolute damping; relative damping leaves the result unchanged
    when the loss is rescaled, while ``damp=1e-5`` alone drops the digits MLP
    from 0.97 to 0.49 test accuracy (90% sparsity) when the loss is scaled by 0.01.

    Removing many weights at once sums single-weight updates that interact;
    ``recompute_steps``, each re-collecting gradients at the updated weights,
    decide the result far more than the damping does. The defaults (16 steps,
    ``relative_damp=0.01``) come from the measurement in ``docs/benchmarks.md``:
    at 90% sparsity, one step scores 0.37 (MLP) and 0.92 (CNN) test accuracy,
    16 steps 0.97 and 0.98; any relative damping from 1e-3 to 1 does about as well.

    Args:
        model: the model; pruned in place.
        loss_fn: ``loss_fn(model(inputs), targets)`` gives a scalar loss.
        data: re-iterable of ``(inputs, targets)`` batches (a list, a DataLoader);
            iterated again from the start when exhausted. Tensors are moved to the
            weights' device.
        params: which weights (see :class:`Pruner`).
        num_grads: gradients per step, one per batch.
        block_size: length of the diagonal blocks of ``F``; ``None`` for the full
            matrix (memory ``num_grads × alive weights``).
        damp: absolute part of ``λ`` (``>= 0``).
        relative_damp: part of ``λ`` relative to the mean diagonal of
            ``(1/n) Σ g_i g_iᵀ`` (``>= 0``); ``relative_damp=0, damp=1e-5`` is the
            absolute damping of the reference implementation.
        scope: ``"global"`` or ``"layer"`` (see :class:`Pruner`).
        progress: show a progress bar while collecting gradients.
        update: ``"sum"``: the M-FAC paper's step above, the single-weight updates
            summed over the blocks of the alive weights. ``"joint"``: exact OBS for
            the weights removed from each block together (:mod:`.block_obs`), on
            blocks of ``block_size`` consecutive weights of each tensor, removed in
            ``rounds`` rounds per step, each re-scored with the weights and inverse
            Fisher the previous round left (for N:M, one weight of each group per
            round): recomputation without new gradients, so ``recompute_steps``
            defaults to 1. Explicit ``B × B`` inverses, one tensor's at a time
            (all of them for a sparsity ranked globally): ``block_size`` is required.
            Exact steps trust the Fisher further than summed ones, so they want
            more gradients (``num_grads`` of at least ``block_size``) and more
            damping; ``docs/benchmarks.md`` has the measurements.
        rounds: removal rounds per step for an unstructured sparsity with
            ``update="joint"``, equal fractions of the remaining weights.
    """

    default_recompute_steps = 16

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: Iterable[ParamSpec] | None = None,
        num_grads: int = 64,
        block_size: int | None = 128,
        damp: float = 0.0,
        relative_damp: float = 0.01,
        scope: Scope = "global",
        progress: bool = True,
        update: Removal = "sum",
        rounds: int = 4,
    ) -> None:
        super().__init__(model, params, scope=scope)
        if update not in ("sum", "joint"):
            raise ValueError(f"update must be 'sum' or 'joint', got {update!r}")
        if update == "joint" and block_size is None:
            raise ValueError("update='joint' needs a block_size (explicit B x B inverses)")
        self.update = update
        self.rounds = check_positive_int(rounds, "rounds")
        if update == "joint":
            self.default_recompute_steps = 1  # the rounds recompute without new gradients
        self.loss_fn = loss_fn
        self.data = data
        self.num_grads = check_positive_int(num_grads, "num_grads")
        self.block_size = (
            None if block_size is None else check_positive_int(block_size, "block_size")
        )
        self.damp = _non_negative(damp, "damp")
        self.relative_damp = _non_negative(relative_damp, "relative_damp")
        if self.damp == self.relative_damp == 0:
            raise ValueError("damp and relative_damp are both 0: the Fisher needs damping > 0")
        self.progress = progress
        self._batches: Iterator[tuple[Any, Any]] | None = None

    def _prune_step(self, goal: _Goal) -> None:
        if self.update == "sum":
            super()._prune_step(goal)
        else:
            self._prune_step_jointly(goal)

    def _prune_step_jointly(self, goal: _Goal) -> None:
        """One step of ``update="joint"``: gradients once, then exact block OBS in rounds.

        Tensors are independent unless an unstructured sparsity is ranked globally: they
        are then pruned one at a time, so that one tensor's inverses are held at once."""
        alive = torch.cat([t.mask().flatten() for t in self.targets])
        if not self._select(goal, torch.zeros(alive.shape, device=self.device), alive).any():
            return
        grads = self.collect_gradients(torch.ones_like(alive))  # pruned weights: zero gradients
        damp = self.damp + relative_damping(grads, self.relative_damp) * alive.numel() / max(
            1, int(alive.sum())
        )  # the mean diagonal over the alive weights
        rounds = self._rounds(goal, alive)
        if goal.sparsity is not None and self.scope == "global":
            self._remove_in_rounds(self.targets, grads, alive, damp, rounds)
            return
        sizes = [t.parameter.numel() for t in self.targets]
        parts = zip(self.targets, grads.split(sizes, 1), alive.split(sizes), strict=True)
        for target, part, part_alive in parts:
            self._remove_in_rounds([target], part, part_alive.clone(), damp, rounds)

    def _remove_in_rounds(
        self,
        targets: list[PruneTarget],
        grads: torch.Tensor,
        alive: torch.Tensor,
        damp: float,
        rounds: list[_Goal],
    ) -> None:
        """Prune ``targets`` (all of them, or one) through ``rounds`` of exact block OBS."""
        size = self.block_size
        assert size is not None
        sizes = [t.parameter.numel() for t in targets]
        inverses = [block_inverse_fisher(g, size, damp, self._dtype) for g in grads.split(sizes, 1)]
        weights = [to_blocks(t.weight().flatten().to(self._dtype), size) for t in targets]
        for number, round_goal in enumerate(rounds, start=1):
            scores = torch.cat(
                [
                    obs_saliency(to_blocks_flat(w, n), to_blocks_flat(h.diagonal(0, -2, -1), n))
                    for w, h, n in zip(weights, inverses, sizes, strict=True)
                ]
            ).masked_fill(~alive, math.inf)
            if len(targets) == len(self.targets):
                removed = self._select(round_goal, scores, alive)
            else:
                removed = _select_in_tensor(targets[0], round_goal, scores, alive)
            for w, h, r in zip(weights, inverses, removed.split(sizes), strict=True):
                remove_jointly(w, h, to_blocks(r, size, False), downdate=number < len(rounds))
            alive &= ~removed
        for target, w, a, n in zip(targets, weights, alive.split(sizes), sizes, strict=True):
            shape = target.parameter.shape
            target.assign(
                to_blocks_flat(w, n).reshape(shape).to(target.parameter.dtype), a.reshape(shape)
            )

    def _rounds(self, goal: _Goal, alive: torch.Tensor) -> list[_Goal]:
        """The removal rounds of one joint step: N:M lowered one weight per group at a time,
        an unstructured sparsity reached in ``rounds`` equal fractions of the remaining weights."""
        if goal.sparsity is None:
            return [_Goal(n=k, m=goal.m) for k in range(goal.m - 1, goal.n - 1, -1)]
        current = 1 - float(alive.float().mean())
        ratio = (1 - goal.sparsity) / (1 - current)
        steps = [
            _Goal(sparsity=1 - (1 - current) * ratio ** (j / self.rounds))
            for j in range(1, self.rounds)
        ]
        return [*steps, goal]

    def _score(self, weights: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, Update]:
        grads = self.collect_gradients(alive)
        damp = self.damp + relative_damping(grads, self.relative_damp)
        if damp == 0:
            raise ValueError(
                "every gradient is zero, so damping relative to them is zero: pass damp > 0"
            )
        inverse = DenseMFAC(grads, damp, self.block_size)
        diag = inverse.diag()

        def update(removed: torch.Tensor) -> torch.Tensor:
            updated = weights + obs_update(weights, removed, diag, inverse.solve)
            return updated.masked_fill_(removed, 0)

        return obs_saliency(weights, diag), update

    def collect_gradients(self, alive: torch.Tensor | None = None) -> torch.Tensor:
        """``[num_grads, d]``: the gradient of each of the next ``num_grads`` batches, one per row.

        ``alive`` (a boolean over all prunable weights) keeps only those
        coordinates; by default the weights not yet pruned.
        """
        if alive is None:
            alive = torch.cat([t.mask().flatten() for t in self.targets])
        dim = int(alive.sum())
        itemsize = torch.empty(0, dtype=self._dtype).element_size()
        ensure_fits(
            self.num_grads * dim * itemsize + self._inverse_bytes(dim),
            self.device,
            what=f"{self.num_grads} gradients of {dim} weights and their M-FAC inverse",
            advice="lower num_grads or block_size",
        )
        params = [t.parameter for t in self.targets]
        alive_index = alive.nonzero().squeeze(1)
        grads = torch.empty(self.num_grads, dim, dtype=self._dtype, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for row in progress(
                range(self.num_grads), desc="M-FAC gradients", enabled=self.progress
            ):
                inputs, targets = self._next_batch()
                with torch.enable_grad():
                    loss = self.loss_fn(self.model(inputs), targets)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise TypeError("loss_fn must return a scalar tensor")
                    parts = torch.autograd.grad(loss, params, allow_unused=True)
                flat = torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).flatten()
                        for p, g in zip(params, parts, strict=True)
                    ]
                )
                grads[row] = flat[alive_index]
        finally:
            self.model.train(was_training)
        # A NaN or Inf makes its row's sum non-finite: no [num_grads, d] mask (a peak of
        # several times the gradients' size in torch's reduction)
        for row in (~torch.isfinite(grads.sum(dim=1))).nonzero().flatten().tolist():
            check_finite(grads[row], f"the gradient of pruning batch {row}")
        return grads

    def _inverse_bytes(self, dim: int) -> int:
        """Peak bytes of the inverse Fisher of ``dim`` weights beyond the gradients: the
        ``DenseMFAC`` of the summed update, or the joint update's explicit ``B × B`` blocks
        of every tensor (ranked globally) or of the largest one, twice for temporaries."""
        if self.update == "sum":
            return DenseMFAC.estimate_bytes(self.num_grads, dim, self.block_size, self._dtype)
        sizes = [t.parameter.numel() for t in self.targets]
        held = sum(sizes) if self.scope == "global" else max(sizes)
        itemsize = torch.empty(0, dtype=self._dtype).element_size()
        return 2 * held * (self.block_size or 1) * itemsize

    def _next_batch(self) -> tuple[Any, Any]:
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.data)
            try:
                inputs, targets = next(self._batches)
            except StopIteration:
                self._batches = None
                continue
            return to_device(inputs, self.device), to_device(targets, self.device)
        raise ValueError(
            "data yielded no batches; pass a re-iterable of (inputs, targets) such as a "
            "list or a DataLoader"
        )


def _select_in_tensor(
    target: PruneTarget, goal: _Goal, scores: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """The alive weights of one tensor to remove for ``goal``: its N:M groups, or its own
    sparsity (what :meth:`Pruner._select` does per tensor)."""
    if goal.sparsity is None:
        rows = target.parameter.shape[0]
        removed = prune_n_m(scores.reshape(rows, -1), alive.reshape(rows, -1), goal.n, goal.m)
        return removed.flatten()
    return prune_lowest(
        scores, alive, count_to_prune(goal.sparsity, alive.numel(), int((~alive).sum()))
    )


def to_blocks_flat(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` entries of ``[blocks, B]`` blocks, flat (the padding dropped)."""
    return blocks.reshape(-1)[:numel]


def _best_of_each(scores: torch.Tensor, alive: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Boolean over all weights: the alive weight of highest score in each tensor."""
    best = torch.zeros_like(alive)
    start = 0
    for size in sizes:
        part = alive[start : start + size]
        if part.any():
            masked = scores[start : start + size].masked_fill(~part, -math.inf)
            best[start + int(torch.argmax(masked))] = True
        start += size
    return best


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
