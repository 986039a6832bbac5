r"""Curvature matrices of a model's loss as matrix-free linear operators, on ``torch.func``.

Every operator here is a symmetric ``D × D`` matrix, ``D`` the number of
entries of ``params``, of the loss over the ``N`` samples of ``data``, their mean or
their sum as ``loss_fn`` reduces its batch:

    L(θ) = c Σ_i ℓ_i(θ),   c = 1/N (reduction="mean", torch's default) or 1 ("sum").

``data`` is any re-iterable of ``(inputs, targets)`` batches (a list, a
``DataLoader``). The reduction is read from ``loss_fn.reduction`` (torch's loss
modules) or a ``functools.partial``'s ``reduction`` keyword; a plain function is taken
to average. With a mean, batch ``b`` of ``B_b`` samples, with loss ``L_b``, enters with
weight ``w_b = B_b / N``: a short last batch weighs what its samples weigh, not what a
full batch weighs. For ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` with class targets,
``B_b`` is the denominator of their own mean, the total class weight of the targets not
ignored (``ignore_index``, ``weight``), so that the operator is that of the loss on all
the data in one batch; a batch whose targets are all ignored is skipped. With a sum,
``w_b = 1``: the batches' summed losses add up to ``L``.

- :class:`HessianOperator`: ``∇²L = Σ_b w_b ∇²L_b``.
- :class:`GGNOperator`: the generalised Gauss-Newton ``G = Σ_b w_b J_bᵀ H_b J_b``,
  ``J_b`` the Jacobian of the model's outputs on batch ``b`` with respect to
  ``params`` and ``H_b`` the Hessian of ``loss_fn`` with respect to those outputs.
  It is the Hessian without the terms in the model's second derivatives, and
  positive semi-definite when the loss is convex in the outputs (cross-entropy, MSE).
- :class:`EmpiricalFisherOperator`: ``F = c Σ_i ∇ℓ_i ∇ℓ_iᵀ``, ``ℓ_i`` the loss of
  sample ``i`` alone (``loss_fn`` on a batch of one; see there for where this
  differs from curvlinops).

Inputs and targets are pytrees (a tensor, or dicts, lists and tuples of tensors with
the batch dimension first). The model must be one fixed function during a product:
a forward pass that writes to its buffers (batch norm in train mode) is refused at
construction with :class:`NondeterminismError`.

The base class :class:`CurvatureOperator` owns the loop over the data, the
weighting, the input and output formats and the checks; each subclass gives
one pure function that, on one batch, does the work shared by all vectors once
(forward and backward passes) and returns the product with one vector, which
the base applies to all the columns of ``V`` at once with ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import check_finite, check_positive_int, ensure_fits
from .._common import LossFn, Params, to_device
from .._progress import progress as progress_bar
from ..errors import NondeterminismError
from ._params import flatten_columns, resolve_params, split_columns
from ._samples import batch_weight, loss_reduction, num_samples
from ._stateless import check_forward_keeps_buffers
from .fisher import empirical_fisher_diagonal, sample_gradients

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "NondeterminismError",
    "empirical_fisher_product",
    "ggn_product",
    "hessian_product",
    "retained_hessian_product",
]


# The default chunk of columns holds about this many samples' activations, and at most
# _MAX_WIDTH columns (see chunk_size). Measured with one thread over widths 1 to 64 on the
# digits CNN and MLP, batches of 32 to 512 (docs/benchmarks.md): the fastest width held
# 512 to 4,096 sample-columns, and wider calls than 16 were slower on the CNN.
_SAMPLE_COLUMNS = 2048
_MAX_WIDTH = 16
# From this many samples in a batch the Hessian's products go one column at a time through
# one kept autograd graph (see HessianOperator).
_LOOP_FROM_SAMPLES = 512


# -- the products on one batch -----------------------------------------------------------------
#
# Each is a pure function of (model, loss_fn, params, inputs, targets) that does the
# work shared by all vectors once (forward and backward passes) and returns the
# product with ONE vector, a dict shaped like ``params``; the operator applies it to
# K vectors at once with ``vmap``.

Product = Callable[[Params], Params]


def _vjp(func: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.vjp`` without ``has_aux``: ``(output, vjp_fn)``."""
    # torch annotates both forms' results as one union, the has_aux triple included
    return vjp(func, *primals)  # type: ignore[return-value]


def hessian_product(
    model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
) -> Product:
    """``v ↦ ∇²L_b v`` by reverse-over-reverse: one backward pass, then the vjp of the gradient."""

    def batch_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (inputs,)), targets)

    _, gradient_vjp = _vjp(grad(batch_loss), params)  # the Hessian is symmetric: vjp = jvp
    return lambda v: gradient_vjp(v)[0]


def retained_hessian_product(
    model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
) -> Product:
    """``v ↦ ∇²L_b v`` by double backward through one kept graph, PyHessian's way: one
    forward and backward pass with ``create_graph``, then for each vector the
    ``autograd.grad`` of the gradient against it. One vector per call (not vmappable).

    The same derivative formulas as :func:`hessian_product`, without ``torch.func``'s
    wrappers: on large batches, where each product's own work dominates and batching
    vectors only lengthens the tensors past the caches, the cheaper of the two."""
    names = list(params)
    leaves = [params[n].detach().requires_grad_() for n in names]
    with torch.enable_grad():
        loss = loss_fn(
            functional_call(model, dict(zip(names, leaves, strict=True)), (inputs,)), targets
        )
        gradient = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    # a block of the gradient that does not depend on the parameters has no Hessian rows
    kept = [i for i, g in enumerate(gradient) if g is not None and g.requires_grad]

    def product(v: Params) -> Params:
        if not kept:
            return {n: torch.zeros_like(leaf) for n, leaf in zip(names, leaves, strict=True)}
        with torch.enable_grad():
            columns = torch.autograd.grad(
                [gradient[i] for i in kept],
                leaves,
                [v[names[i]] for i in kept],
                retain_graph=True,
                allow_unused=True,
            )
        return {
            n: torch.zeros_like(leaf) if h is None else h
            for n, leaf, h in zip(names, leaves, columns, strict=True)
        }

    return product


def ggn_product(
    model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
) -> Product:
    """``v ↦ J_bᵀ H_b J_b v`` in reverse mode only: ``J v`` as the vjp of the (linear)
    pullback ``u ↦ Jᵀu``, ``H_b`` as the vjp of the loss's gradient in output space, ``Jᵀ``
    as the pullback. Forward mode would be ~30% faster but many layers (fused attention,
    custom autograd functions) have no forward derivative; every layer with a double
    backward works here, as for the Hessian."""

    def outputs(p: Params) -> torch.Tensor:
        return functional_call(model, p, (inputs,))

    f, pullback = _vjp(outputs, params)
    _, push_forward = _vjp(lambda u: pullback(u)[0], torch.zeros_like(f))
    _, output_hessian = _vjp(lambda f: grad(loss_fn)(f, targets), f)

    def product(v: Params) -> Params:
        (jv,) = push_forward(v)
        (hjv,) = output_hessian(jv)
        return pullback(hjv)[0]

    return product


def empirical_fisher_product(
    model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
) -> Product:
    """``v ↦ c Gᵀ (G v)`` with ``G`` the ``B × D`` per-sample gradients, formed once, and
    ``c = 1/B`` for a mean-reduced ``loss_fn``, ``1`` for a sum-reduced one."""
    grads = sample_gradients(model, loss_fn, params, inputs, targets)
    scale = 1 if loss_reduction(loss_fn) == "sum" else next(iter(grads.values())).shape[0]

    def product(v: Params) -> Params:
        coefficients = sum(grads[n].flatten(1) @ v[n].flatten() for n in v)  # ∇ℓ_i · v
        return {n: torch.tensordot(coefficients, grads[n], dims=1) / scale for n in v}

    return product


# -- the operators ------------------------------------------------------------------------------


class CurvatureOperator:
    """A symmetric ``D × D`` curvature matrix of ``L = c Σ_i ℓ_i``, applied without forming it.

    ``op @ x`` takes a flat vector ``[D]``, a ``[D, K]`` matrix or a list of
    tensors shaped like ``params`` (ordered as ``params``), and returns the
    same format. Each product is one pass over ``data``; on each batch the
    shared work is done once and the ``K`` columns go through ``vmap``
    ``chunk_size`` at a time.

    Args:
        model: any ``nn.Module`` whose output on a batch of inputs is a tensor;
            it should be deterministic (eval mode: no dropout, no batch statistics).
        loss_fn: ``loss_fn(outputs, targets)``, the mean over the batch (``c = 1/N``)
            or, where its ``reduction`` says ``"sum"``, the sum (``c = 1``).
        params: tensors of ``model.parameters()`` to differentiate with respect
            to, in the order of the vector's blocks; ``None``: all that require grad.
            The other parameters and the buffers are held fixed.
        data: re-iterable of ``(inputs, targets)`` batches, each a tensor or a pytree
            of tensors with the batch dimension first; tensors in dicts, lists and
            tuples are moved to the parameters' device.
        chunk_size: at most this many columns go through one vmapped call; memory
            grows with it, about ``chunk_size`` times the activations of one batch.
            ``None``: ``max(1, 2048 // batch size)``, at most 16, so that a call
            holds the activations of at most about 2,048 samples. On the digits CNN
            and MLP (CPU, batches of 32 to 512), that is about the fastest width:
            larger calls leave the caches and are slower per column, smaller ones
            pay the per-call overhead more often (docs/benchmarks.md). With ``None``,
            :class:`HessianOperator` takes batches of 512 samples or more one column
            at a time through plain autograd instead (see there).
        check_deterministic: at construction, compute the loss and the gradient
            twice over ``data`` (two passes with one backward per batch) and raise
            :class:`NondeterminismError` if they differ (dropout or batch norm in
            train mode, random augmentation, shuffling).
        progress: show a progress bar over the batches of each product.

    Raises:
        NondeterminismError: a forward pass on the first batch writes to the model's
            buffers (batch norm in train mode: call ``model.eval()``), checked whatever
            ``check_deterministic``; or the determinism check failed.
        ValueError: ``loss_fn``'s reduction is neither ``"mean"`` nor ``"sum"``, or
            ``params`` is empty or not the model's.
        TypeError: ``data`` is an iterator (not re-iterable).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Iterable[torch.Tensor] | None,
        data: Iterable[tuple[Any, Any]],
        *,
        chunk_size: int | None = None,
        check_deterministic: bool = True,
        progress: bool = False,
    ) -> None:
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of batches or a DataLoader), not an iterator "
                "or generator: every product makes a new pass over it"
            )
        self.reduction = loss_reduction(loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        self.names, self.params = resolve_params(model, params)
        self.data = data
        self.chunk_size = (
            None if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
        )
        self.progress = progress
        self._shapes = tuple(p.shape for p in self.params)
        self.dim = sum(p.numel() for p in self.params)
        first_batch = next(iter(data), None)
        if first_batch is not None:  # else torch.func fails at the first product, less clearly
            check_forward_keeps_buffers(model, to_device(first_batch[0], self.device))
        if check_deterministic:
            self.check_deterministic()

    @staticmethod
    def _batch_product(
        model: nn.Module, loss_fn: LossFn, params: Params, inputs: Any, targets: Any
    ) -> Product:
        """The one method a subclass provides: ``v ↦ A_b v`` for its matrix on one batch
        (of the batch's loss as ``loss_fn`` reduces it), a pure function like
        :func:`hessian_product`."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, params={len(self.params)})"
        )

    # -- products --------------------------------------------------------------------------------

    def __matmul__(self, x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]):
        if isinstance(x, torch.Tensor):
            self._check_vector(x, "the vector")
            if x.ndim == 1 and x.shape[0] == self.dim:
                return self._matmat(x[:, None])[:, 0]
            if x.ndim == 2 and x.shape[0] == self.dim:
                return self._matmat(x)
            raise ValueError(
                f"expected a vector of length {self.dim} or a [{self.dim}, K] matrix, "
                f"got shape {tuple(x.shape)}"
            )
        if isinstance(x, (list, tuple)):
            if len(x) != len(self.params) or not all(
                isinstance(t, torch.Tensor) and t.shape == s
                for t, s in zip(x, self._shapes, strict=False)
            ):
                got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t) for t in x]
                expected = [tuple(s) for s in self._shapes]
                raise ValueError(f"expected tensors shaped like params {expected}, got {got}")
            for index, t in enumerate(x):
                self._check_vector(t, f"block {index} of the vector")
            out = self._matmat(flatten_columns([t[None] for t in x]))
            return type(x)(block[0] for block in split_columns(out, self._shapes))
        return NotImplemented

    def _check_vector(self, x: torch.Tensor, what: str) -> None:
        if x.dtype != self.dtype:
            raise TypeError(f"{what} is {x.dtype} but the operator is {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{what} is on {x.device} but the operator on {self.device}")
        check_finite(x, what)

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """``A @ matrix`` for a ``[D, K]`` matrix: one pass over the data.

        The work is laid out by rows, one row per vector (``[K, D]``), so that each chunk
        of vectors and each chunk of products is a contiguous block: ``Σ_b w_b (A_b V)ᵀ``
        is accumulated there and returned transposed (a view). With a mean, ``B_b`` weighs
        each batch and the sum is divided by ``N`` at the end; with one batch the sum is
        its product as computed (``B_b / N = 1``), with no scaling pass.
        """
        num_columns = matrix.shape[1]
        if num_columns == 0:
            return torch.zeros_like(matrix)
        rows = matrix.T.contiguous()  # free when the caller's matrix is a transposed [K, D]
        sizes = [p.numel() for p in self.params]
        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        total, first_weight, count, num_batches = None, 1.0, 0.0, 0
        # torch.func ignores an outer no_grad; it stops the graph back to the model's own tensors.
        # The fused attention kernels have no second derivatives; the math one has.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for inputs, targets in self._batches(type(self).__name__):
                batch_size = num_samples(targets, inputs)
                share = batch_weight(self.loss_fn, inputs, targets)
                if self.reduction == "mean" and share == 0:
                    continue  # every target ignored: nothing of the mean is in this batch
                weight = share if self.reduction == "mean" else 1
                product, width = self._product_on_batch(params, inputs, targets, batch_size)
                products = _products_by_rows(product, rows, self.names, self._shapes, sizes, width)
                if total is None:
                    total, first_weight = products, weight
                else:
                    if num_batches == 1 and first_weight != 1:
                        total.mul_(first_weight)
                    total.add_(products, alpha=weight)
                count += share
                num_batches += 1
        if total is None:
            raise ValueError("data holds no samples (or every target is ignored)")
        if num_batches > 1 and self.reduction == "mean":
            total.div_(count)
        return total.T

    def _product_on_batch(
        self, params: Params, inputs: Any, targets: Any, batch_size: int
    ) -> tuple[Product, int]:
        """The product on one batch and how many vectors go through it per (vmapped) call."""
        product = self._batch_product(self.model, self.loss_fn, params, inputs, targets)
        return product, self.columns_per_call(batch_size) or 1

    def columns_per_call(self, batch_size: int) -> int | None:
        """How many vectors one vmapped call takes on a batch of ``batch_size`` samples:
        ``chunk_size`` if given, else about 2,048 samples' worth, at most 16 (measured:
        docs/benchmarks.md). ``None``: one vector at a time through one kept graph
        (:class:`HessianOperator` on large batches)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return min(_MAX_WIDTH, max(1, _SAMPLE_COLUMNS // batch_size))

    def _batches(self, desc: str):
        for inputs, targets in progress_bar(self.data, desc=desc, enabled=self.progress):
            yield to_device(inputs, self.device), to_device(targets, self.device)

    # -- loss, gradient and the determinism check ------------------------------------------------

    def loss_and_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``L`` and the flat gradient ``∇L`` over all of ``data`` (one pass, one backward a batch):
        the mean of the samples' losses, or their sum for a sum-reduced ``loss_fn``."""
        _, _, loss, gradient = self._loss_and_gradient_pass()
        return loss, gradient

    def _loss_and_gradient_pass(self):
        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

        def batch_loss(p: Params, inputs: Any, targets: Any) -> torch.Tensor:
            return self.loss_fn(functional_call(self.model, p, (inputs,)), targets)

        sizes, losses = [], []
        gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for inputs, targets in self._batches("loss and gradient"):
                share = batch_weight(self.loss_fn, inputs, targets)
                if self.reduction == "mean" and share == 0:
                    continue  # every target ignored, as in the products
                grads, loss = grad_and_value(batch_loss)(params, inputs, targets)
                weight = share if self.reduction == "mean" else 1
                gradient += weight * torch.cat([grads[n].reshape(-1) for n in self.names])
                sizes.append(share)
                losses.append(loss.detach())
        if not sizes:
            raise ValueError("data holds no samples (or every target is ignored)")
        stacked = torch.stack(losses)
        if self.reduction == "sum":
            return sizes, stacked, stacked.sum(), gradient
        count = sum(sizes)
        total = (stacked * torch.tensor(sizes, dtype=stacked.dtype, device=stacked.device)).sum()
        return sizes, stacked, total / count, gradient / count

    def check_deterministic(self) -> None:
        """Raise :class:`NondeterminismError` unless two passes over the data agree.

        Compares the batch sizes, every batch's loss and the gradient, to a
        relative tolerance of ``sqrt(eps)`` of the dtype.
        """
        sizes1, losses1, _, gradient1 = self._loss_and_gradient_pass()
        sizes2, losses2, _, gradient2 = self._loss_and_gradient_pass()
        rtol = math.sqrt(torch.finfo(self.dtype).eps)
        causes = (
            "the operator would average over a moving target. Likely causes: dropout or batch "
            "norm in train mode (call model.eval()), random augmentation, or a DataLoader with "
            "shuffle=True"
        )
        if sizes1 != sizes2:
            raise NondeterminismError(
                f"two passes over data gave different batch sizes ({sizes1} vs {sizes2}); {causes}"
            )
        scale = gradient1.norm() + torch.finfo(self.dtype).tiny
        if not torch.allclose(losses1, losses2, rtol=rtol, atol=0.0) or not bool(
            (gradient1 - gradient2).norm() <= rtol * scale
        ):
            raise NondeterminismError(
                f"two passes over data gave different losses or gradients; {causes}"
            )

    # -- other views -----------------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """The ``D × D`` matrix (``D`` products in one pass); for small models and tests."""
        nbytes = 2 * self.dim * self.dim * self.params[0].element_size()  # identity and result
        ensure_fits(
            nbytes,
            self.device,
            what=f"a dense {self.dim} x {self.dim} matrix",
            advice="use products (op @ v) or the estimators instead",
        )
        return self._matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out) for scipy's solvers."""
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("to_scipy needs scipy: pip install 'secondorder[scipy]'") from error

        def matmat(x):
            x = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return self._matmat(x.reshape(self.dim, -1)).reshape(x.shape).cpu().numpy()

        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat,
            dtype=numpy_dtype,
        )  # fmt: skip


class HessianOperator(CurvatureOperator):
    r"""The Hessian ``∇²L = Σ_b w_b ∇²L_b`` of the loss over ``data`` (mean or sum, see the module).

    Per batch: one forward and backward pass, kept, then one reverse pass through it per
    vector. Batches of fewer than 512 samples (or any batch when ``chunk_size`` is
    given) use ``torch.func``: the vjp of the gradient, vmapped over ``chunk_size``
    columns at a time. Larger batches use plain autograd, one double backward per
    column (:func:`retained_hessian_product`): there each product's own work dominates,
    and on the digits CNN and MLP at 512 samples batching columns gained nothing or lost
    up to 20% (docs/benchmarks.md). Arguments as :class:`CurvatureOperator`.
    """

    _batch_product = staticmethod(hessian_product)

    def _product_on_batch(
        self, params: Params, inputs: Any, targets: Any, batch_size: int
    ) -> tuple[Product, int]:
        if self.columns_per_call(batch_size) is None:
            return retained_hessian_product(self.model, self.loss_fn, params, inputs, targets), 1
        return super()._product_on_batch(params, inputs, targets, batch_size)

    def columns_per_call(self, batch_size: int) -> int | None:
        if self.chunk_size is None and batch_size >= _LOOP_FROM_SAMPLES:
            return None
        return super().columns_per_call(batch_size)


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton ``G = Σ_b w_b J_bᵀ H_b J_b`` of the loss over ``data``.

    ``J_b = ∂f(x_b; θ)/∂θ`` is the Jacobian of the model's outputs on batch
    ``b`` and ``H_b = ∂²loss_fn(f, y_b)/∂f²`` the Hessian of the batch's loss
    with respect to those outputs, taken by ``torch.func`` for any ``loss_fn``.
    Arguments as :class:`CurvatureOperator`.
    """

    _batch_product = staticmethod(ggn_product)


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher ``F = c Σ_i ∇ℓ_i ∇ℓ_iᵀ`` over the ``N`` samples of ``data``.

    ``c = 1/N`` for a mean-reduced ``loss_fn``, ``1`` for a sum-reduced one.
    ``ℓ_i = loss_fn(model(x_i[None]), y_i[None])``, ``loss_fn`` on sample ``i`` alone,
    so each sample is run on its own (``vmap`` over the batch, every tensor of a pytree
    of inputs split along its first dimension): the model must not mix samples (no
    batch statistics). Per batch, the ``B × D`` per-sample gradients are formed once
    (memory ``B × D``), then each column costs two matrix-vector products.
    Arguments as :class:`CurvatureOperator`.

    Two conventions differ from curvlinops' ``EFLinearOperator`` (both legitimate):

    - ``ℓ_i`` is ``loss_fn`` on a batch of one, with ``loss_fn``'s own reduction over
      the sample's outputs. With a mean-reduced ``MSELoss`` or ``BCEWithLogitsLoss``
      on ``C`` outputs that is a mean over the ``C``, and curvlinops' EF (which sums
      over outputs) is ``C`` times this one; with cross-entropy or a sum they agree.
    - For sequence outputs (``[B, T, C]``), a sample is a sequence: one gradient per
      sequence, of its loss over all ``T`` tokens, where curvlinops takes one
      gradient per token.
    """

    _batch_product = staticmethod(empirical_fisher_product)

    def diagonal(self) -> torch.Tensor:
        """The exact diagonal ``(1/N) Σ_i ∇ℓ_i ⊙ ∇ℓ_i``, flat (one pass of per-sample gradients)."""
        blocks = empirical_fisher_diagonal(  # the batches carry this operator's own bar
            self.model, self.loss_fn, self.params, self._batches("EF diagonal"), progress=False
        )
        return torch.cat([b.reshape(-1) for b in blocks])


def _apply(product: Product, columns: Params) -> Params:
    """``product`` on each of the ``K`` columns (``[K, *shape]`` per name), vectorised by ``vmap``."""
    try:
        if next(iter(columns.values())).shape[0] == 1:  # vmap costs more than it saves here
            return {n: t[None] for n, t in product({n: c[0] for n, c in columns.items()}).items()}
        return vmap(product)(columns)
    except RuntimeError as error:
        if "randomness" in str(error):
            raise NondeterminismError(
                "the model calls a random operation (dropout in train mode?); "
                "call model.eval() before building the operator"
            ) from error
        raise


def _products_by_rows(
    product: Product,
    rows: torch.Tensor,
    names: tuple[str, ...],
    shapes: tuple[torch.Size, ...],
    sizes: list[int],
    width: int,
) -> torch.Tensor:
    """``[K, D]``: ``product`` of each row of ``rows`` (one flat vector per row), ``width`` rows
    per call. Each chunk of rows is cut into per-parameter views (no copy) and its products are
    written into the matching rows of the result in one ``cat``."""
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], width):
        chunk = rows[start : start + width]
        count = chunk.shape[0]
        blocks = {
            n: block.view(count, *shape)
            for n, block, shape in zip(names, chunk.split(sizes, dim=1), shapes, strict=True)
        }
        products = _apply(product, blocks)
        torch.cat(
            [products[n].reshape(count, -1) for n in names], dim=1, out=out[start : start + width]
        )
    return out
