"""Where the time of the M-FAC estimators goes: torch.profiler tables, by operator.

    python benchmarks/profile_mfac.py --part window   # 50 update_solve steps, n = 64, d = 1e5
                                                      # (and the operators per step)
    python benchmarks/profile_mfac.py --part dense    # DenseMFAC(G).diag() at n = 1024, d = 1e5

The figures of docs/benchmarks.md that come from a profile (time per step in the two
matrix-vector products; the share of copies in the precomputation) are read off these.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from mfac_bench import distinct_gradients, full_window
from torch.profiler import ProfilerActivity, profile

from secondorder.curvature import DenseMFAC


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["window", "dense"], default="window")
    parser.add_argument("--n", type=int, help="window size (64 for window, 1024 for dense)")
    parser.add_argument("--d", type=float, default=1e5, help="gradient length")
    args = parser.parse_args()
    d = int(args.d)
    torch.manual_seed(0)
    if args.part == "window":
        n, steps = args.n or 64, 50
        window = full_window(n, d, 1e-6, "auto")
        gradients = distinct_gradients(d)
        for _ in range(10):
            window.update_solve(next(gradients))

        def work() -> None:
            for _ in range(steps):
                window.update_solve(next(gradients))
    else:
        n, steps = args.n or 1024, 1
        grads = torch.randn(n, d)

        def work() -> None:
            DenseMFAC(grads, 1e-4).diag()  # the factor, then W = L⁻¹G a piece at a time

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    print(f"# {args.part}, n = {n}, d = {d}, {steps} call(s), {torch.get_num_threads()} threads")
    averages = prof.key_averages(group_by_input_shape=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    # the operators the Python code calls (not those they call in turn): each is a
    # dispatch on CPU and a kernel launch (or none, for a view) on a GPU
    calls = Counter(e.name for e in prof.events() if e.cpu_parent is None)
    total = sum(calls.values()) / steps
    print(f"\n{total:.0f} top-level operators per call, of which:")
    print(
        ", ".join(
            f"{name.removeprefix('aten::')} {count / steps:g}"
            for name, count in calls.most_common()
        )
    )


if __name__ == "__main__":
    main()
