"""PyTorch's own generic optimizer tests, run on an ``OptimizerInfo`` table of our optimizers.

PyTorch tests every ``torch.optim`` optimizer with one file, ``test/test_optim.py`` of its
repository (not shipped in the wheel): each generic test is parametrised over ``optim_db``, a
list of ``OptimizerInfo`` (``torch.testing._internal.common_optimizers``, shipped in the
wheel) that says how to build the optimizer and which of its features to test. This script
swaps ``optim_db`` for a table of ours before the file is imported, runs its device-generic
class (``TestOptimRenewedCPU``) under pytest on the CPU, and prints passed/failed/skipped
per optimizer with each failure's test and a one-line reason.

Usage (PyTorch's ``test_optim.py`` is not part of this repository: point at a copy of the
file from the PyTorch source tree matching the installed torch)::

    python benchmarks/torch_optim_suite.py --test-optim ~/src/pytorch/test/test_optim.py
    python benchmarks/torch_optim_suite.py --test-optim PATH -k state_dict  # a subset

It needs ``expecttest`` (imported by PyTorch's test utilities): ``pip install expecttest``.

The table. Each row is an ``OptimizerInfo`` whose ``optim_inputs_func`` gives keyword
arguments that are valid both for the constructor and inside a parameter group, because
several tests put them in a group (``test_param_groups_lr``, ``..._weight_decay``):

* ``MFAC``, ``MFACPlain`` (``graft=None``), ``MFACSparse`` (``density=0.3``): the window
  settings (``num_grads``, ``damp``, ``density``, ``graft``) belong to the optimizer's one
  window and MFAC refuses them inside a group with a ``ValueError`` naming the key, so each
  row is a subclass that fixes them; the inputs vary ``lr``, ``momentum``, ``weight_decay``
  and the grafting ``betas``. ``test_errors`` checks that refusal.
* ``GaLoreAdamW``, ``NaturalGaLore``, ``DCTAdamW``, ``SST``: every input carries
  ``rank=1, update_proj_gap=2``, so the tests' matrices are projected (or trained
  spectrally) and refreshed within their few steps; their vectors stay plain AdamW, as
  in any group with ``rank``. Rank 1 because the smallest matrix the tests build is
  (5, 1) and a rank above a matrix's smaller side is refused at construction by design.
* ``SOAP``: ``precondition_frequency=2`` so its bases are refreshed within the tests'
  steps, with and without ``precondition_1d``, ``weight_decay``, ``basis="dct"``.
* The AdamW-core rows (all but MFAC) also run with ``nonfinite="skip_on_device"`` (a
  constructor option, hence a subclass row ``<name>SkipOnDevice``).
* Any other class in ``secondorder.optim.__all__`` (a new optimizer) gets a default row
  (a non-default ``lr``, ``weight_decay``) until it is given its own. No input leaves
  ``lr`` at its default: ``test_load_state_dict_post_hook`` asserts ``lr != 0.003``,
  which is SOAP's default.

What does not apply, and why (these tests are not generated for our rows, or skip on CPU):

* ``foreach``/``fused``/``differentiable``/``capturable`` (``test_foreach_matches_forloop``,
  ``test_fused_*``, ``test_cpu_load_state_dict``, ``test_set_default_dtype_works_with_foreach``,
  ``test_peak_memory_foreach``, ``test_defaults_changed_to_foreach``, ...): our optimizers
  have one implementation each (``functional.adamw`` picks per-tensor or foreach kernels by
  device itself) and no ``foreach``/``fused``/``differentiable``/``capturable`` arguments,
  so ``supported_impls=()`` and ``has_capturable_arg=False``.
* ``maximize``: no optimizer of ours takes it; no input sets it, so the tests' maximize
  branches are not exercised.
* Sparse gradients (``test_rosenbrock_sparse``, the float64 test): not supported
  (``supports_sparse=False``); dense gradients only.
* Complex parameters (``test_complex``, ``test_complex_2d``) run for MFAC and SOAP only:
  the low-rank rows refuse a complex matrix in a group with ``rank`` by design (the
  projection and SST's factors are real), and every input of theirs has ``rank``.
  ``test_complex_2d`` (a complex vector against its real and imaginary parts as two
  tensors) is skipped for SOAP and MFAC, which are not elementwise. SOAP rotates the
  real view of a complex vector, an (n, 2) matrix, but steps two real vectors with Adam
  (``precondition_1d=False``). MFAC with grafting rescales the step of each tensor to the
  norm of its own Adam step, so one complex tensor and two real ones are different
  problems; without grafting the window's dot products, summed in another order, agree
  only to rounding, which Rosenbrock's large gradients against ``damp=0.1`` amplify
  beyond the test's float32 tolerance.
* Closure-requiring second-order steps (``test_second_order_optims_return_consistent_types``,
  LBFGS-style): our steps take an optional closure only.
* CUDA/multi-GPU/MPS tests (``@onlyCUDA``, ``TEST_MULTIGPU``, ``largeTensorTest``): CPU only.
* Dtypes are pinned by each test's ``@optims(..., dtypes=...)``: float32 for the generic
  tests, complex64 for the complex ones; the float64 tests are foreach/sparse ones above.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import secondorder.optim as ours

WINDOW = {"num_grads": 4, "damp": 0.1}
LOW_RANK = {"rank": 1, "update_proj_gap": 2}


def _variant(base: type, name: str, **fixed: Any) -> type:
    """A subclass of ``base`` named ``name`` whose constructor defaults to ``fixed``."""
    init = functools.partialmethod(base.__init__, **fixed)
    return type(name, (base,), {"__init__": init, "__module__": __name__})


def _inputs(*kwargs_list: dict[str, Any]) -> Any:
    """An ``optim_inputs_func`` giving one ``OptimizerInput`` per keyword dict."""
    from torch.testing._internal.common_optimizers import OptimizerInput

    def inputs(device: Any = None, dtype: Any = None) -> list[Any]:
        return [OptimizerInput(params=None, kwargs=dict(k), desc=str(k)) for k in kwargs_list]

    return inputs


def _error_inputs(extra: list[tuple[dict[str, Any], type, str]]) -> Any:
    """PyTorch's error inputs for every optimizer, plus ``(kwargs, error, regex)`` of ours."""
    from torch.testing._internal.common_optimizers import (
        ErrorOptimizerInput,
        OptimizerInput,
        get_error_inputs_for_all_optims,
    )

    def error_inputs(device: Any, dtype: Any) -> list[Any]:
        found = get_error_inputs_for_all_optims(device, dtype)
        for kwargs, error, regex in extra:
            kwargs = dict(kwargs)
            sample = torch.nn.Parameter(torch.randn(3, 2, device=device, dtype=dtype))
            params = kwargs.pop("params", [sample])
            found.append(
                ErrorOptimizerInput(
                    OptimizerInput(params=params, kwargs=kwargs, desc=regex),
                    error_type=error,
                    error_regex=regex,
                )
            )
        return found

    return error_inputs


def _mfac_rows(optimizer_info: type) -> list[Any]:
    group_kwargs = [
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "betas": (0.8, 0.99)},
    ]
    # M-FAC's own momentum applies to the grafted or plain direction; the prior's step is
    # Adam's, whose first moment is its momentum (MFAC refuses both)
    with_momentum = _inputs(*group_kwargs, {"lr": 0.01, "momentum": 0.5})
    without_momentum = _inputs(*group_kwargs)

    def window_in_group(device: Any, dtype: Any) -> list[Any]:
        weight = torch.nn.Parameter(torch.randn(3, 2, device=device, dtype=dtype))
        return [
            (
                {"params": [{"params": [weight], "num_grads": 3}]},
                ValueError,
                "num_grads=3 in a parameter group: num_grads belongs to MFAC's one window",
            ),
            ({"lr": -1.0}, ValueError, "lr"),
        ]

    def errors(device: Any, dtype: Any) -> list[Any]:
        return _error_inputs(window_in_group(device, dtype))(device, dtype)

    variants = {
        "MFAC": (WINDOW, without_momentum),  # the default: Adam's diagonal as prior
        "MFACGrafted": ({**WINDOW, "prior": None}, with_momentum),
        "MFACPlain": ({**WINDOW, "graft": None}, with_momentum),
        "MFACSparse": ({**WINDOW, "density": 0.3, "prior": None}, with_momentum),
    }
    not_elementwise = _skip(
        "test_complex_2d",
        "M-FAC is not elementwise: one complex tensor and its real and imaginary parts as "
        "two tensors are different problems under grafting, and agree only to rounding "
        "without it (module docstring)",
    )
    return [
        optimizer_info(
            _variant(ours.MFAC, name, **window),
            optim_inputs_func=inputs,
            optim_error_inputs_func=errors,
            supported_impls=(),
            not_og_supported_flags=(),
            supports_complex=True,
            skips=(not_elementwise,),
        )
        for name, (window, inputs) in variants.items()
    ]


def _skip(test: str, reason: str) -> Any:
    """Skip PyTorch's ``test`` for a row, with ``reason``."""
    import unittest

    from torch.testing._internal.opinfo.core import DecorateInfo

    return DecorateInfo(unittest.skip(reason), "TestOptimRenewed", test)


def _adamw_core_rows(optimizer_info: type) -> list[Any]:
    """The low-rank family and SOAP, each also with ``nonfinite="skip_on_device"``."""
    extra = {"NaturalGaLore": {"history": 3, "damp": 1e-3}, "SST": {"uniform_mix": 0.5}}
    kwargs_lists: dict[type, list[dict[str, Any]]] = {}
    for cls in (ours.GaLoreAdamW, ours.NaturalGaLore, ours.DCTAdamW, ours.SST):
        base = {**LOW_RANK, **extra.get(cls.__name__, {})}
        kwargs_lists[cls] = [
            {**base, "lr": 0.01},
            {**base, "lr": 0.01, "weight_decay": 0.1},
            {**base, "lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-7},
        ]
    soap = getattr(ours, "SOAP", None)
    if soap is not None:
        base = {"lr": 0.01, "precondition_frequency": 2}
        kwargs_lists[soap] = [
            base,
            {**base, "precondition_1d": True, "weight_decay": 0.1},
            {**base, "basis": "dct", "betas": (0.9, 0.99)},
        ]
    errors = _error_inputs([({"lr": -1.0}, ValueError, "lr")])
    soap_skips = (
        _skip(
            "test_complex_2d",
            "SOAP is not elementwise: the real view of a complex vector is an (n, 2) matrix, "
            "which it rotates, while its real and imaginary parts as two vectors get Adam",
        ),
    )
    rows = []
    for cls, kwargs_list in kwargs_lists.items():
        for name, fixed in ((cls.__name__, {}), (f"{cls.__name__}SkipOnDevice", {"nonfinite": "skip_on_device"})):  # fmt: skip
            rows.append(
                optimizer_info(
                    _variant(cls, name, **fixed) if fixed else cls,
                    optim_inputs_func=_inputs(*kwargs_list),
                    optim_error_inputs_func=errors,
                    supported_impls=(),
                    not_og_supported_flags=(),
                    supports_complex=cls is soap,
                    skips=soap_skips if cls is soap else (),
                )
            )
    return rows


def build_table() -> list[Any]:
    """Our ``OptimizerInfo`` rows: the known optimizers, then a default row for any other."""
    from torch.testing._internal.common_optimizers import OptimizerInfo

    table = _mfac_rows(OptimizerInfo) + _adamw_core_rows(OptimizerInfo)
    known = {"MFAC", "GaLoreAdamW", "NaturalGaLore", "DCTAdamW", "SST", "SOAP"}
    for name in ours.__all__:
        cls = getattr(ours, name)
        if name in known or not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        print(f"note: {name} has no row of its own yet; testing it with a default row")
        table.append(
            OptimizerInfo(
                cls,
                optim_inputs_func=_inputs({"lr": 0.01}, {"lr": 0.01, "weight_decay": 0.1}),
                optim_error_inputs_func=_error_inputs([]),
                supported_impls=(),
                not_og_supported_flags=(),
                supports_complex=False,
            )
        )
    return table


def _stub_sibling_modules(test_dir: Path) -> None:
    """``test_optim.py`` imports other classes from ``test/optim/``; without that folder
    (a copy of the one file), stand empty modules in for them so the file imports."""
    sys.path.insert(0, str(test_dir))
    stubs = {
        "optim.test_lrscheduler": "TestLRScheduler",
        "optim.test_optim": "TestDifferentiableOptimizer",
        "optim.test_swa_utils": "TestSWAUtils",
    }
    for module, cls in stubs.items():
        try:
            importlib.import_module(module)
        except ImportError:
            sys.modules.setdefault("optim", types.ModuleType("optim"))
            stub = types.ModuleType(module)
            setattr(stub, cls, type(cls, (), {}))
            sys.modules[module] = stub


class Collector:
    """A pytest plugin: installs the table before collection, records each test's outcome."""

    def __init__(self, table: list[Any]) -> None:
        self.table = table
        self.names = sorted((info.name for info in table), key=len, reverse=True)
        self.outcomes: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(
            lambda: defaultdict(list)
        )

    def pytest_configure(self, config: Any) -> None:
        import torch.testing._internal.common_optimizers as common

        common.optim_db = self.table

    def optimizer_of(self, test: str) -> str:
        for name in self.names:
            if re.search(rf"_{name}_cpu(_|$)", test):
                return name
        return "?"

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.skipped or report.failed):
            return
        test = report.nodeid.rsplit("::", 1)[-1]
        if report.passed and report.when == "call":
            self.outcomes[self.optimizer_of(test)]["passed"].append((test, ""))
        elif report.skipped:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
            self.outcomes[self.optimizer_of(test)]["skipped"].append((test, str(reason)))
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            reason = message.strip().splitlines()[0][:160] if message.strip() else "?"
            self.outcomes[self.optimizer_of(test)]["failed"].append((test, reason))


def summarise(collector: Collector) -> int:
    """Print the per-optimizer table and the failures; the number of failures."""
    header = f"{'optimizer':<26}{'passed':>8}{'failed':>8}{'skipped':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    totals = [0, 0, 0]
    for info in collector.table:
        counts = [len(collector.outcomes[info.name][k]) for k in ("passed", "failed", "skipped")]
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        print(f"{info.name:<26}{counts[0]:>8}{counts[1]:>8}{counts[2]:>9}")
    print("-" * len(header) + f"\n{'total':<26}{totals[0]:>8}{totals[1]:>8}{totals[2]:>9}")
    for name, outcomes in collector.outcomes.items():
        for test, reason in outcomes["skipped"]:
            print(f"SKIPPED [{name}] {test}: {reason}")
        for test, reason in outcomes["failed"]:
            print(f"FAILED [{name}] {test}: {reason}")
    return totals[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-optim", type=Path, help="PyTorch's test/test_optim.py")
    parser.add_argument("-k", default=None, help="pytest -k expression to run a subset")
    parser.add_argument("--verbose", action="store_true", help="pytest's own output too")
    args = parser.parse_args(argv)
    if args.test_optim is None or not args.test_optim.is_file():
        print(
            "skipped: give --test-optim PATH, a copy of test/test_optim.py from the PyTorch "
            f"source tree for torch {torch.__version__} (git {torch.version.git_version[:12]})"
        )
        return 0
    try:
        import expecttest  # noqa: F401  (PyTorch's test utilities import it)
        import pytest
    except ImportError as missing:
        print(f"skipped: {missing.name} is not installed (pip install expecttest pytest)")
        return 0
    os.environ.setdefault("PYTORCH_TESTING_DEVICE_ONLY_FOR", "cpu")
    _stub_sibling_modules(args.test_optim.resolve().parent)
    collector = Collector(build_table())
    pytest_args = [f"{args.test_optim}::TestOptimRenewedCPU", "-p", "no:cacheprovider"]
    pytest_args += ["-q", "-rN"] if not args.verbose else ["-v"]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest.main(pytest_args, plugins=[collector])
    return 1 if summarise(collector) else 0


if __name__ == "__main__":
    sys.exit(main())
