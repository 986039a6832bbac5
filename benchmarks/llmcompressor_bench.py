"""The library side by side with llm-compressor (the vLLM project's package) on the tiny Llama.

    python benchmarks/llmcompressor_bench.py --peer-python /tmp/llmc/bin/python
    python benchmarks/llmcompressor_bench.py --peer-python /tmp/llmc/bin/python --layers 4 16
    python benchmarks/llmcompressor_bench.py              # our side only

llm-compressor pins its own transformers, so it lives in a separate virtual environment
(``python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor``)
and runs there: ``benchmarks/llmcompressor_peer.py`` under ``--peer-python``. Without
that Python, or without llmcompressor in it, only our side is measured, with a message.

The model is the byte-level Llama of the pruning benchmark
(``secondorder/_workloads/llama_pruning.py``: hidden 128, 4 heads) with ``--layers``
decoder layers and an intermediate size of 384, so that every input width is a multiple
of 128 (llm-compressor's grouped quantization cannot quantize the 344 columns of the
default model's ``down_proj`` in groups of 128); trained for ``--steps`` AdamW steps
and cached under ``runs/cache``. Both sides get the same 128 calibration windows of
128 training bytes in batches of 2 (the pruning benchmark's); each compresses the
attention and MLP matrices (not embeddings, not the output layer) with:

- ``SparseGPT 50%`` / ``2:4``: ``SparseGPTPruner.prune`` against ``SparseGPTModifier``;
- ``Wanda 50%``: ``WandaPruner.prune`` against ``WandaPruningModifier``;
- ``GPTQ 4-bit g128``: ``GPTQQuantizer(bits=4, group_size=128)`` against ``GPTQModifier``
  with the asymmetric scheme ``W4A16_ASYM``, no activation ordering, 1% damping;
- ``SparseGPT 50% + GPTQ 4-bit g128``: ours in one sweep (``prune(0.5, bits=4)``),
  llm-compressor as its recipe of a ``SparseGPTModifier`` then a ``GPTQModifier``.

Every call runs in a fresh process (ours with this Python, the peer's with its own) so
that its peak memory is its own: the growth of the peak resident set during the call
(``secondorder/_workloads/measure.py``, on both sides). Wall time is of the call only:
our pruner's construction and ``prune``/``quantize``; llm-compressor's ``oneshot`` on
the model already loaded (its dataset preparation included, as a user pays it). The
held-out loss of both is computed here by the same code: the peer's compressed weights
come back as a file and are loaded into our copy of the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secondorder._workloads import llama_pruning as llm_pruning
from secondorder._workloads.data import TextCorpus, load_stdlib_corpus
from secondorder._workloads.language_model import matrix_layers, new_model, validation_loss
from secondorder._workloads.measure import measured
from secondorder._workloads.report import markdown_table
from secondorder.prune import SparseGPTPruner, WandaPruner
from secondorder.quantize import GPTQQuantizer

PEER = Path(__file__).resolve().parent / "llmcompressor_peer.py"


def _sparsegpt(**options: Any) -> Callable[[nn.Module, list], object]:
    def run(model: nn.Module, data: list) -> object:
        params = llm_pruning.prunable_weights(model)
        return SparseGPTPruner(model, data, params=params, progress=False).prune(**options)

    return run


def _wanda(model: nn.Module, data: list) -> object:
    return WandaPruner(
        model, data, params=llm_pruning.prunable_weights(model), progress=False
    ).prune(0.5)


def _gptq(model: nn.Module, data: list) -> object:
    params = llm_pruning.prunable_weights(model)
    return GPTQQuantizer(
        model, data, bits=4, group_size=128, params=params, progress=False
    ).quantize()


#: the compressions compared, by name (llmcompressor_peer.py has the peer's recipe of each)
OURS: dict[str, Callable[[nn.Module, list], object]] = {
    "SparseGPT 50%": _sparsegpt(sparsity=0.5),
    "SparseGPT 2:4": _sparsegpt(n_m=(2, 4)),
    "Wanda 50%": _wanda,
    "GPTQ 4-bit g128": _gptq,
    "SparseGPT 50% + GPTQ 4-bit g128": _sparsegpt(sparsity=0.5, bits=4, group_size=128),
}


def bench_setup(layers: int, steps: int) -> llm_pruning.LlamaPruneSetup:
    """The pruning benchmark's setup with ``layers`` decoder layers, intermediate 384, ``steps`` steps."""
    base = llm_pruning.LlamaPruneSetup()
    model = dataclasses.replace(
        base.model, num_layers=layers, intermediate_size=384, steps=steps,
        warmup=max(1, steps // 20),
    )  # fmt: skip
    return dataclasses.replace(base, model=model)


def trained_model(
    setup: llm_pruning.LlamaPruneSetup, corpus: TextCorpus, **options: Any
) -> nn.Module:
    """A fresh copy of the trained (or cached) dense model."""
    state, _ = llm_pruning.trained_llama(setup, corpus, **options)
    model = new_model(corpus, setup.model)
    model.load_state_dict(state)
    return model


def zero_fraction(model: nn.Module) -> float:
    """Fraction of exact zeros in the attention and MLP matrices."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight.detach() for name in matrix_layers(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def ours_child(method: str, layers: int, steps: int, threads: int) -> None:
    """Run in its own process: one call of ours on the cached model; print the result as JSON."""
    torch.set_num_threads(threads)
    setup = bench_setup(layers, steps)
    corpus = load_stdlib_corpus(setup.model.corpus_bytes)
    model = trained_model(setup, corpus, show_progress=False)
    data = llm_pruning.calibration_data(setup, corpus)
    with measured(torch.device("cpu")) as measurement:
        OURS[method](model, data)
    result = {
        "loss": validation_loss(model, corpus, setup.model),
        "zeros": zero_fraction(model),
        "seconds": measurement.seconds,
        "peak_bytes": measurement.peak_bytes,
    }
    print(json.dumps(result))


def last_json(command: list[str]) -> dict[str, Any]:
    """Run ``command``; the JSON object on the last line of its output."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_available(python: str | None) -> bool:
    """Whether ``python`` runs and imports llmcompressor; says why not when it does not."""
    if python is None:
        print("llm-compressor: no --peer-python given; measuring our side only")
        return False
    try:
        version = last_json([python, str(PEER), "--check"])["llmcompressor"]
    except (OSError, RuntimeError, ValueError, IndexError) as error:
        print(f"llm-compressor not usable with {python} ({error}); measuring our side only")
        return False
    print(f"llm-compressor {version} ({python})")
    return True


def peer_run(
    python: str, method: str, folder: Path, setup: llm_pruning.LlamaPruneSetup,
    corpus: TextCorpus, dense: dict[str, torch.Tensor], threads: int,
) -> dict[str, Any]:  # fmt: skip
    """One ``oneshot`` call in the peer's Python; its weights scored here as ours are."""
    out = folder / "peer_weights.pt"
    result = last_json([
        python, str(PEER), "--model", str(folder / "dense"), "--calibration",
        str(folder / "calibration.pt"), "--method", method, "--out", str(out),
        "--batch-size", str(setup.calibration_batch), "--threads", str(threads),
    ])  # fmt: skip
    weights = torch.load(out, weights_only=True)
    unknown = set(weights) - set(dense)
    if unknown:
        raise RuntimeError(f"the peer returned weights the model does not have: {sorted(unknown)}")
    model = new_model(corpus, setup.model)
    model.load_state_dict({**dense, **weights})
    return {
        **result,
        "loss": validation_loss(model, corpus, setup.model),
        "zeros": zero_fraction(model),
    }


def compare_depth(args: argparse.Namespace, layers: int, peer: bool) -> list[list[str]]:
    """Every method at ``layers`` decoder layers, ours and the peer's; rows of the table."""
    setup = bench_setup(layers, args.steps)
    corpus = load_stdlib_corpus(setup.model.corpus_bytes)
    dense_model = trained_model(setup, corpus, show_progress=True)
    dense = {k: v.detach().clone() for k, v in dense_model.state_dict().items()}
    print(
        f"\n{layers} layers: dense held-out loss {validation_loss(dense_model, corpus, setup.model):.4f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if peer:
            dense_model.save_pretrained(folder / "dense")
            windows = torch.cat(
                [inputs for inputs, _ in llm_pruning.calibration_data(setup, corpus)]
            )
            torch.save(windows, folder / "calibration.pt")
        for method in args.methods:
            command = [
                sys.executable, __file__, "--ours-child", method, "--layers", str(layers),
                "--steps", str(args.steps), "--threads", str(args.threads),
            ]  # fmt: skip
            sides = {"secondorder": last_json(command)}
            if peer:
                sides["llm-compressor"] = peer_run(
                    args.peer_python, method, folder, setup, corpus, dense, args.threads
                )
            for side, r in sides.items():
                peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
                rows.append([str(layers), method, side, f"{r['loss']:.4f}", f"{r['zeros']:.3f}",
                             f"{r['seconds']:.2f}", peak])  # fmt: skip
                print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="Python of the environment with llmcompressor")
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="decoder layers")
    parser.add_argument("--steps", type=int, default=500, help="training steps of the dense model")
    parser.add_argument("--methods", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--ours-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_child:
        ours_child(args.ours_child, args.layers[0], args.steps, args.threads)
        return
    torch.set_num_threads(args.threads)
    peer = peer_available(args.peer_python)
    rows = [row for layers in args.layers for row in compare_depth(args, layers, peer)]
    header = ["layers", "method", "library", "held-out loss", "zeros", "time (s)", "peak RSS (MiB)"]
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s)\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
