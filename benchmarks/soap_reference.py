"""``secondorder.optim.SOAP`` side by side with the authors' SOAP: how far the trajectories part.

    python benchmarks/soap_reference.py --reference PATH/TO/soap.py
    python benchmarks/soap_reference.py --reference PATH/TO/soap.py --dtype float64

The reference is the authors' file (github ``nikhilvyas/SOAP``, ``soap.py`` at commit
``a1e5535``; fetch it yourself, e.g. ``git clone https://github.com/nikhilvyas/SOAP &&
git -C SOAP show a1e5535:soap.py > soap.py``); without it the script says so and stops.

Each configuration trains a small model from the same initial weights on the same fixed
batches, once with each optimizer at the same settings, and reports the largest relative
distance between the two parameter vectors over the steps, ``max_t ‖θ_t − θ_t^ref‖ /
‖θ_t^ref‖``, and the same relative to the distance travelled ``‖θ_t^ref − θ_0‖``.

The ``floor`` column is the reference against itself with every gradient after the first
multiplied by ``1 + noise · N(0, 1)`` (``--noise``, one rounding of the dtype by default):
how far rounding alone moves the trajectory. Where it is large the comparison cannot tell
a faithful implementation from another; ``well-posed`` marks the configurations where it
is small, the ones ``tests/test_soap_faithful.py`` holds to 1e-4. The last column jitters
the first gradient too: the Gram of one gradient is rank-deficient and ``eigh`` picks its
null-space eigenvectors by rounding, so only an implementation that forms the first Gram
and its eigendecomposition with the reference's bits can follow it where that column is
large. The configurations marked not well-posed show the other traps: the
default ``merge_dims`` turns each conv kernel into one long vector, and ``precondition_1d``
gives each bias a Gram, whose ranks grow by one gradient per step, so the first basis
refresh sorts and orthogonalises null-space directions that rounding chose; softmax
cross-entropy leaves the output layer's gradient orthogonal to the all-ones direction, and
Adam's ``m / (sqrt(v) + eps)`` in the eigenbasis turns the rounding noise along it into
steps of size ``lr``.

In float64 (``--dtype float64``) the reference still rounds each Gram to float32 before its
``eigh`` (run in float64) and runs the basis refresh in float32; an implementation that
does not round likewise chooses a different first basis.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from secondorder._workloads.report import markdown_row, markdown_table
from secondorder._workloads.soap_configs import CONFIGURATIONS, trajectory


def relative_distances(
    actual: list[torch.Tensor], expected: list[torch.Tensor]
) -> tuple[float, float]:
    """``max_t ‖a_t − e_t‖ / ‖e_t‖`` and ``max_t ‖a_t − e_t‖ / ‖e_t − e_0‖`` (over moved steps)."""
    to_parameters = max(
        float((a - e).norm() / e.norm()) for a, e in zip(actual, expected, strict=True)
    )
    moved = [
        (a, e) for a, e in zip(actual, expected, strict=True) if not torch.equal(e, expected[0])
    ]
    to_travel = max(
        (float((a - e).norm() / (e - expected[0]).norm()) for a, e in moved), default=0.0
    )
    return to_parameters, to_travel


def load_reference(path: Path) -> type[torch.optim.Optimizer]:
    """The ``SOAP`` class of the authors' ``soap.py``."""
    spec = importlib.util.spec_from_file_location("authors_soap", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SOAP


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """The reference makes its Grams in the default dtype: run it all in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def compare(reference: type, ours: type, steps: int, dtype: torch.dtype, noise: float) -> None:
    header = ["configuration", "well-posed", "ours vs reference", "/ travel", "floor", "/ travel"]
    header.append("floor, first step too")
    print(markdown_table(header, []))
    for configuration in CONFIGURATIONS:
        expected = trajectory(configuration, reference, steps, dtype)
        actual = trajectory(configuration, ours, steps, dtype)
        jittered = trajectory(configuration, reference, steps, dtype, noise)
        from_first = trajectory(configuration, reference, steps, dtype, noise, first_too=True)
        ours_rel, ours_travel = relative_distances(actual, expected)
        floor_rel, floor_travel = relative_distances(jittered, expected)
        well_posed = "yes" if configuration.well_posed else "no"
        cells = [ours_rel, ours_travel, floor_rel, floor_travel]
        cells.append(relative_distances(from_first, expected)[0])
        print(markdown_row([configuration.name, well_posed, *(f"{c:.1e}" for c in cells)]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, help="the authors' soap.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--noise", type=float, default=None, help="relative gradient jitter")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.reference is None or not args.reference.is_file():
        print(f"the authors' soap.py was not found ({args.reference}): nothing to compare")
        return
    try:
        from secondorder.optim import SOAP
    except ImportError:
        print("secondorder.optim has no SOAP: nothing to compare")
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    noise = args.noise if args.noise is not None else float(torch.finfo(dtype).eps)
    print(f"# {args.steps} steps, {args.dtype}, floor noise {noise:.1e}, torch {torch.__version__}")
    with default_dtype(dtype):
        compare(load_reference(args.reference), SOAP, args.steps, dtype, noise)


if __name__ == "__main__":
    main()
