"""The peer packages a user would otherwise pick, imported for side-by-side runs.

They are optional dependencies of the benchmarks only, never of the library; each loader
returns ``None`` with a message when its package is missing, and the benchmark skips it.
``ista-daslab-optimizers`` (1.1.15) cannot be imported on a CPU-only machine as it ships:
its ``__init__`` imports every optimizer, and those import CUDA extensions, ``wandb`` and
``gpustat``. :func:`ista_module` registers the package and the subpackages a module needs
as empty packages pointing at the installed folders, so that only that module (and what
it imports itself) runs, in this process only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import types

import torch

_ISTA = "ista_daslab_optimizers"


def ista_module(name: str) -> types.ModuleType | None:
    """``ista_daslab_optimizers.<name>`` without running the package's ``__init__`` files;
    ``None`` (with a message) when the package is not installed."""
    if _ISTA in sys.modules:  # registered by an earlier call
        folder = sys.modules[_ISTA].__path__[0]
    else:
        spec = importlib.util.find_spec(_ISTA)
        if spec is None or not spec.submodule_search_locations:
            print(
                "ista-daslab-optimizers is not installed: the peer is skipped "
                "(pip install --no-deps ista-daslab-optimizers==1.1.15)"
            )
            return None
        folder = spec.submodule_search_locations[0]
    parts = name.split(".")
    for depth in range(len(parts)):
        package = ".".join([_ISTA, *parts[:depth]])
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = ["/".join([folder, *parts[:depth]])]
            sys.modules[package] = module
    for helper in ("utils", "fft_low_rank"):  # imported by the modules themselves
        package = f"{_ISTA}.{helper}"
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [f"{folder}/{helper}"]
            sys.modules[package] = module
    with contextlib.redirect_stdout(io.StringIO()):  # its warnings about CUDA extensions
        return importlib.import_module(f"{_ISTA}.{name}")


def load_dense_core_mfac() -> type | None:
    """``DenseCoreMFAC`` made to run on CPU. Without its CUDA extension it falls back to
    PyTorch, but two calls of that fallback do not run on CPU: ``torch.lu(A, pivot=False)``,
    whose ``A`` is symmetric positive definite there (its unpivoted LU follows from the
    Cholesky factor ``C``: ``L = C diag(C)⁻¹``, ``U = diag(C) Cᵀ``), and
    ``nn.parallel.parallel_apply`` (called one after another): both are swapped in
    ``torch`` for the rest of this process."""
    module = ista_module("dense_mfac.dense_core_mfac")
    if module is None:
        return None

    def lu_without_pivoting(A, pivot=True, get_infos=False):
        C = torch.linalg.cholesky(A)
        root = C.diagonal()
        return torch.tril(C / root, -1) + root[:, None] * C.T, None

    torch.lu = lu_without_pivoting
    torch.nn.parallel.parallel_apply = lambda fns, args: [
        f(a) for f, a in zip(fns, args, strict=True)
    ]
    return module.DenseCoreMFAC


def load_dct_adamw() -> type | None:
    """ISTA's ``DCTAdamW`` (pure PyTorch). Use ``sim_type="makhoul"``: its default
    ``"matmul"`` selects DCT-III vectors (``/work/shared/peers.md``)."""
    module = ista_module("fft_low_rank.dct_adamw")
    return None if module is None else module.DCTAdamW
