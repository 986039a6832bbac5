r"""The update rules of the optimisers, as functions of tensors.

In the manner of ``torch.optim.adamw.adamw``: an optimiser's ``step`` gathers its tensors,
checks them, and calls one of these; the arithmetic lives here once.

Adam's moments and step, for a gradient ``g`` at step ``t`` (counting this one):

.. math::

    m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    w &\leftarrow (1 - \text{lr} \cdot \text{wd})\, w
        - \frac{\text{lr}}{1 - \beta_1^t} \cdot \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

in the operations, and the order, of ``torch.optim.AdamW`` (``ε`` after the bias correction
of ``√v``); ``correct_bias=False`` drops both corrections (GaLore's flag).

``found_inf`` (a 0-d bool tensor, ``nonfinite="skip_on_device"``) masks every write:
``torch.where(found_inf, old, new)``, so that a step found to hold NaN or Inf leaves every
tensor bit for bit as it was without reading the host. A step count ``t`` given as a 0-d
tensor (on the device) gives the bits a Python number would on a CPU: the bias corrections
are computed in float64 with the operations Python applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "adam_moments_",
    "adam_scaling",
    "adamw",
    "apply_adam_",
    "decoupled_decay_",
    "graft_norms",
    "masked_copy_",
    "written",
]

Scalar = float | torch.Tensor


def masked_copy_(old: torch.Tensor, new: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    """``old ← new``, unless ``found_inf`` (then ``old`` keeps its bits)."""
    if found_inf is None:
        old.copy_(new)
    else:
        torch.where(found_inf.to(old.device), old, new.to(old.dtype), out=old)


class written:
    """``weight`` itself, or a copy in ``dtype`` written back (rounded once) when the block
    exits without an error: for a low-precision weight with float32 statistics, or under a
    ``found_inf`` (the copy is written back unless it is true)."""

    def __init__(
        self, weight: torch.Tensor, dtype: torch.dtype, found_inf: torch.Tensor | None = None
    ) -> None:
        self.weight, self.found_inf = weight, found_inf
        same = weight.dtype == dtype and found_inf is None
        self.target = weight if same else weight.to(dtype, copy=True)

    def __enter__(self) -> torch.Tensor:
        return self.target

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.target is not self.weight:
            masked_copy_(self.weight, self.target, self.found_inf)


def adam_moments_(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """``m ← β₁ m + (1 − β₁) g`` and ``v ← β₂ v + (1 − β₂) g²``, in place."""
    if found_inf is None:
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        masked_copy_(exp_avg, exp_avg.lerp(grad, 1 - beta1), found_inf)
        masked_copy_(
            exp_avg_sq, exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2), found_inf
        )


def adam_scaling(
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    correct_bias: bool = True,
    correction_in_step_size: bool = False,
) -> tuple[Scalar, torch.Tensor]:
    """Adam's step size and denominator at step ``step``: the update is
    ``−step_size · m / denom`` (:func:`apply_adam_`).

    ``torch.optim.AdamW``'s form divides ``√v`` by ``√(1 − β₂ᵗ)`` before adding ``ε``;
    ``correction_in_step_size`` moves that correction into the step size instead,
    ``lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` with ``denom = √v + ε`` (Adam's paper's "efficient
    version", and SOAP's)."""
    if not correct_bias:
        return lr, exp_avg_sq.sqrt().add_(eps)
    if not isinstance(step, torch.Tensor):
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if correction_in_step_size:
            return lr * bias_correction2_sqrt / (1 - beta1**step), exp_avg_sq.sqrt().add_(eps)
        return lr / (1 - beta1**step), (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    t = step.to(torch.float64)
    half = torch.full((), 0.5, dtype=torch.float64, device=t.device)
    correction2 = torch.pow(1 - beta2**t, half)
    lr_t = torch.full((), lr, dtype=torch.float64, device=t.device)
    if correction_in_step_size:
        return torch.div(lr_t * correction2, 1 - beta1**t), exp_avg_sq.sqrt().add_(eps)
    denom = (exp_avg_sq.sqrt() / correction2.to(exp_avg_sq.dtype)).add_(eps)
    return torch.div(lr_t, 1 - beta1**t), denom


def apply_adam_(
    target: torch.Tensor, exp_avg: torch.Tensor, denom: torch.Tensor, step_size: Scalar
) -> None:
    """``target ← target − step_size · m / denom``."""
    if isinstance(step_size, torch.Tensor):
        target.addcdiv_(exp_avg * (-step_size).to(exp_avg.dtype), denom)
    else:
        target.addcdiv_(exp_avg, denom, value=-step_size)


def add_scaled_(target: torch.Tensor, update: torch.Tensor, alpha: Scalar) -> None:
    """``target ← target + alpha · update`` (one rounding, for a float or 0-d ``alpha``)."""
    if isinstance(alpha, torch.Tensor):
        target.addcmul_(update, alpha.to(update.dtype))
    else:
        target.add_(update, alpha=alpha)


def decoupled_decay_(target: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``w ← (1 − lr · wd) w``, AdamW's decoupled weight decay."""
    if weight_decay:
        target.mul_(1 - lr * weight_decay)


def adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[int | torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool = True,
    foreach: bool | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """AdamW on lists of tensors, as ``torch.optim.adamw.adamw`` (bit-identical to it).

    ``state_steps`` are each parameter's step number ``t`` counting this step (the caller
    counts; a 0-d tensor on the device under ``found_inf``). The moments may be of a wider
    dtype than the weights (float32 statistics for bf16 weights): a weight is then updated
    in that dtype and rounded once. ``foreach`` (default: on GPUs) uses the
    ``torch._foreach_*`` kernels, one launch per operation for all tensors; it needs host
    step counts and no ``found_inf``."""
    if foreach is None:
        foreach = bool(params) and params[0].device.type != "cpu"
    host_steps = [step for step in state_steps if not isinstance(step, torch.Tensor)]
    if foreach and found_inf is None and len(host_steps) == len(state_steps):
        _foreach_adamw(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), host_steps,
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       correct_bias=correct_bias)  # fmt: skip
        return
    for weight, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        adam_moments_(exp_avg, exp_avg_sq, grad, beta1=beta1, beta2=beta2, found_inf=found_inf)
        step_size, denom = adam_scaling(
            exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, correct_bias=correct_bias
        )
        with written(weight, exp_avg.dtype, found_inf) as target:
            decoupled_decay_(target, lr, weight_decay)
            apply_adam_(target, exp_avg, denom, step_size)


def _foreach_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    """:func:`adamw` with ``torch._foreach_*`` kernels: the same operations in the same order."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    if correct_bias:
        torch._foreach_div_(denoms, [(1 - beta2**step) ** 0.5 for step in state_steps])
        step_sizes = [-lr / (1 - beta1**step) for step in state_steps]
    else:
        step_sizes = [-lr] * len(state_steps)
    torch._foreach_add_(denoms, eps)
    wide = [
        p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs, strict=True)
    ]
    if weight_decay:
        torch._foreach_mul_(wide, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(wide, exp_avgs, denoms, step_sizes)
    narrow = [(p, w) for p, w in zip(params, wide, strict=True) if w is not p]
    if narrow:  # low-precision weights: rounded once
        torch._foreach_copy_([p for p, _ in narrow], [w for _, w in narrow])


def graft_norms(
    direction: torch.Tensor,
    step: torch.Tensor,
    segments: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """``‖s_p‖ / ‖u_p‖`` for each segment ``p`` of two flat vectors (0 where ``u_p = 0``),
    as float64 sums of squares: grafting scales a direction ``u`` to another optimiser's
    step norm ``‖s_p‖``, segment by segment. Returns the two sums of squares, ``[2, count]``,
    for the caller to reduce (over ranks) before taking the ratio."""
    sums = torch.zeros(2, count, dtype=torch.float64, device=direction.device)
    sums[0].index_add_(0, segments, direction.double().square())
    sums[1].index_add_(0, segments, step.double().square())
    return sums
