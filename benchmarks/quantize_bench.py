"""GPTQ against the authors' reference on the same layers; results and commands in docs/benchmarks.md.

    python benchmarks/quantize_bench.py --reference /path/to/IST-DASLab/gptq \
        --sparsegpt-reference /path/to/IST-DASLab/sparsegpt
    GPTQ_REFERENCE=/path/to/gptq SPARSEGPT_REFERENCE=... python benchmarks/quantize_bench.py

The reference is a checkout of IST-DASLab/gptq (its ``gptq.py`` and ``quant.py``);
without one the comparison is skipped with a message. It runs on the CPU here once
``torch.cuda.synchronize`` is a no-op, which this script arranges in its own process.

Each layer gets the same weights and calibration inputs on both sides, in float32
(the reference's dtype): inputs with a few strongly scaled features and correlated
columns, as linear layers in transformers see. For every setting this prints the
fraction of quantized weights equal to the reference's, the output error
``‖(W − Q) Xᵀ‖²`` of each (and of round-to-nearest on the same grids), their ratio, and
the time of one layer's quantization on each side (calibration excluded; the fastest of
``--repeats`` alternating runs).

With IST-DASLab/sparsegpt as well, SparseGPT's joint mode (``sparsegpt_prune(...,
bits=4, group_size=-1)``) is compared with the reference's ``--wbits 4`` (4-bit
asymmetric grids per output row) at 50% and 2:4 on the same layers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secondorder._workloads.report import markdown_table
from secondorder.prune.obs_sweep import HessianStatistic
from secondorder.prune.sparsegpt import sparsegpt_sweep
from secondorder.quantize import gptq_quantize, minmax_grid, round_to_grid

#: (bits, group_size, act_order, symmetric): the issue's settings, act-order with groups
#: at 3 bits, and symmetric grids
SETTINGS = [(4, -1, False, False), (4, 128, False, False), (4, 128, True, False),
            (4, -1, True, False), (3, 64, False, False), (3, 64, True, False),
            (4, 128, False, True)]  # fmt: skip
#: (rows, cols, tokens, dead inputs) of the layers compared
LAYERS = [(256, 512, 4096, 0), (512, 344, 4096, 0), (192, 256, 2048, 8)]


def load_reference(path: str | None, name: str, repository: str, flag: str) -> ModuleType | None:
    """The module ``name`` of a reference checkout (with the ``quant`` beside it), or ``None``."""
    if not path or not (Path(path) / f"{name}.py").is_file():
        print(
            f"{repository} not found: pass {flag} (a checkout holding {name}.py and quant.py); "
            "its comparison is skipped"
        )
        return None
    sys.path.insert(0, str(Path(path).resolve()))
    sys.modules.pop("quant", None)  # each reference imports its own quant.py
    torch.cuda.synchronize = lambda *args, **kwargs: None  # the references call it per layer
    with contextlib.redirect_stdout(io.StringIO()):  # "CUDA extension not installed."
        module = importlib.import_module(name)
    sys.path.pop(0)
    return module


def layer_data(
    rows: int, cols: int, tokens: int, dead: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[rows, cols]`` and inputs ``[tokens, cols]``: correlated, a few features 20x
    the rest, and ``dead`` features zero on every token."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols**0.5
    scales = torch.ones(cols)
    scales[torch.randperm(cols, generator=gen)[: cols // 64]] = 20.0
    inputs = (torch.randn(tokens, cols, generator=gen) @ mixing) * scales
    inputs[:, torch.randperm(cols, generator=gen)[:dead]] = 0
    weights = torch.randn(rows, cols, generator=gen) / cols**0.5
    return weights, inputs


def reference_gptq(
    module: ModuleType, weights, inputs, bits, group_size, act_order, symmetric, block
):
    """The reference's quantized weights and its time (s)."""
    layer = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    layer.weight.data = weights.clone()
    quantizer = module.Quantizer()
    quantizer.configure(bits, perchannel=True, sym=symmetric, mse=False)
    runner = module.GPTQ(layer)
    runner.quantizer = quantizer
    runner.add_batch(inputs.unsqueeze(0), None)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        runner.fasterquant(blocksize=block, percdamp=0.01, groupsize=group_size, actorder=act_order)
    return layer.weight.data.clone(), time.perf_counter() - start


def ours(weights, inputs, bits, group_size, act_order, symmetric, block):
    """Our quantized weights and time (s), calibration not timed (as for the reference)."""
    statistic = HessianStatistic(inputs.shape[1], inputs.device, torch.float32)
    statistic.add(inputs)
    start = time.perf_counter()
    record = gptq_quantize(
        weights, statistic.hessian(), bits=bits, group_size=group_size, act_order=act_order,
        symmetric=symmetric, block_size=block,
    )  # fmt: skip
    return record.dequantize(), time.perf_counter() - start


def round_to_nearest(
    weights: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> torch.Tensor:
    """Round-to-nearest on min-max grids of the original weights, per row and group."""
    size = weights.shape[1] if group_size == -1 else group_size
    parts = []
    for group in weights.split(size, dim=1):
        scale, zero = minmax_grid(group, bits, symmetric)
        codes = round_to_grid(group, scale[:, None], zero[:, None], bits)
        parts.append(scale[:, None] * (codes - zero[:, None]))
    return torch.cat(parts, dim=1)


def same_grid_point(mine: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of weights equal up to float32 rounding (1e-4 relative): the same grid point.

    Two sides that find a group's grid on weights that differ in the last bits get
    scales a few ulps apart; a different code is a whole grid step apart.
    """
    close = torch.isclose(mine, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    return float(close.float().mean())


def output_error(weights: torch.Tensor, quantized: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((weights - quantized).double() @ inputs.double().T).square().sum())


def compare(module: ModuleType, block: int, repeats: int) -> None:
    header = ["layer", "bits", "group", "act-order", "grid", "equal weights", "error (ours / ref.)",
              "RTN / ref.", "time ours (s)", "time ref. (s)"]  # fmt: skip
    rows = []
    for seed, (n_rows, cols, tokens, dead) in enumerate(LAYERS):
        weights, inputs = layer_data(n_rows, cols, tokens, dead, seed)
        for bits, group_size, act_order, symmetric in SETTINGS:
            setting = (bits, group_size, act_order, symmetric)
            ref_time = our_time = float("inf")
            for _ in range(repeats):  # alternating, so that both see the same load
                reference, seconds = reference_gptq(module, weights, inputs, *setting, block)
                ref_time = min(ref_time, seconds)
                mine, seconds = ours(weights, inputs, *setting, block)
                our_time = min(our_time, seconds)
            equal = same_grid_point(mine, reference)
            ref_error = output_error(weights, reference, inputs)
            rtn = round_to_nearest(weights, bits, group_size, symmetric)
            rtn_error = output_error(weights, rtn, inputs)
            rows.append([
                f"{n_rows}x{cols}" + (f", {dead} dead inputs" if dead else ""), str(bits), str(group_size), "yes" if act_order else "no",
                "symmetric" if symmetric else "asymmetric",
                f"{equal:.4f}", f"{output_error(weights, mine, inputs) / ref_error:.4f}",
                f"{rtn_error / ref_error:.2f}", f"{our_time:.3f}", f"{ref_time:.3f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(markdown_table(header, rows))


def reference_joint(module: ModuleType, weights, inputs, pattern: dict, block: int):
    """SparseGPT's reference pruning and quantizing (4 bits, per row) in one sweep."""
    layer = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    layer.weight.data = weights.clone()
    runner = module.SparseGPT(layer)
    runner.quantizer = module.Quantizer()
    runner.quantizer.configure(4, perchannel=True, sym=False, mse=False)
    runner.add_batch(inputs.unsqueeze(0), None)
    n_m = pattern.get("n_m")
    options = {"sparsity": 0, "prunen": n_m[1] - n_m[0], "prunem": n_m[1]} if n_m else pattern
    with contextlib.redirect_stdout(io.StringIO()):
        runner.fasterprune(blocksize=block, percdamp=0.01, **options)
    return layer.weight.data.clone()


def compare_joint(module: ModuleType, block: int) -> None:
    """Joint pruning and 4-bit quantization against SparseGPT's reference (its ``--wbits 4``)."""
    header = ["layer", "pattern", "equal weights", "error (ours / ref.)"]
    rows = []
    for seed, (n_rows, cols, tokens, dead) in enumerate(LAYERS):
        weights, inputs = layer_data(n_rows, cols, tokens, dead, seed)
        statistic = HessianStatistic(cols, inputs.device, torch.float32)
        statistic.add(inputs)
        for pattern in ({"sparsity": 0.5}, {"n_m": (2, 4)}):
            reference = reference_joint(module, weights, inputs, pattern, block)
            mine, _, _ = sparsegpt_sweep(
                weights, statistic.hessian(), **pattern, block_size=block, bits=4, group_size=-1
            )
            ratio = output_error(weights, mine, inputs) / output_error(weights, reference, inputs)
            name = "50%" if "sparsity" in pattern else "2:4"
            rows.append([f"{n_rows}x{cols}" + (f", {dead} dead inputs" if dead else ""), name,
                         f"{same_grid_point(mine, reference):.4f}", f"{ratio:.4f}"])  # fmt: skip
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference",
        default=os.environ.get("GPTQ_REFERENCE"),
        help="checkout of IST-DASLab/gptq (default: $GPTQ_REFERENCE)",
    )
    parser.add_argument(
        "--sparsegpt-reference",
        default=os.environ.get("SPARSEGPT_REFERENCE"),
        help="checkout of IST-DASLab/sparsegpt, for the joint mode (default: $SPARSEGPT_REFERENCE)",
    )
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="times: the fastest of this many")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gptq = load_reference(args.reference, "gptq", "IST-DASLab/gptq", "--reference")
    if gptq is not None:
        compare(gptq, args.block_size, args.repeats)
    sparsegpt = load_reference(
        args.sparsegpt_reference, "sparsegpt", "IST-DASLab/sparsegpt", "--sparsegpt-reference"
    )
    if sparsegpt is not None:
        compare_joint(sparsegpt, args.block_size)


if __name__ == "__main__":
    main()
