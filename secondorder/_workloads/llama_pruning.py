"""Pruning a tiny Llama: M-FAC OBS against SparseGPT, Wanda and magnitude, with one API.

The byte-level Llama of the low-rank comparison (:mod:`.language_model`) is trained once
on the standard library's text and cached under ``runs/``; copies of it are
pruned to 50%, 70% and 2:4 sparsity of the attention and MLP matrices
(embeddings and the output layer stay dense) by every method, from the same 128
calibration sequences of training text, and scored by the held-out loss in nats
per byte. Copies are also quantized to 4 bits by GPTQ, and pruned to 50% and quantized
in one SparseGPT sweep. Used by ``secondorder prune --models llama``, the demo's pruning section
and ``benchmarks/prune_bench.py --part llama``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._progress import progress
from ..prune import MagnitudePruner, MFACPruner, Pruner, SparseGPTPruner, WandaPruner
from ..prune.pruners import Scope
from ..quantize import GPTQQuantizer
from .data import TextCorpus, load_stdlib_corpus
from .language_model import (
    LMSetup,
    matrix_layers,
    new_model,
    train_step,
    validation_loss,
    warmup_cosine,
)
from .measure import measured
from .report import markdown_table

TITLE = "Pruning a tiny Llama: M-FAC OBS against SparseGPT, Wanda and magnitude"

#: sparsity patterns: keyword arguments of ``Pruner.prune``
PATTERNS: dict[str, dict[str, Any]] = {
    "50%": {"sparsity": 0.5},
    "70%": {"sparsity": 0.7},
    "2:4": {"n_m": (2, 4)},
}


@dataclass(frozen=True)
class LlamaPruneSetup:
    """The model and its training, the calibration and evaluation data, and M-FAC's settings."""

    model: LMSetup = field(
        default_factory=lambda: LMSetup(steps=2000, warmup=100, batch_size=8, eval_batches=64)
    )
    lr: float = 1e-3
    calibration_sequences: int = 128
    calibration_batch: int = 2  # sequences per batch: one M-FAC gradient each
    num_grads: int = 64
    block_size: int = 128
    mfac_relative_damp: float = 0.01
    mfac_recompute_steps: int | None = None  # None: MFACPruner's default
    # M-FAC with update="joint": one gradient per calibration sequence, all of them
    joint_relative_damp: float = 0.1
    joint_rounds: int = 4
    seed: int = 0

    @property
    def calibration_batches(self) -> int:
        return self.calibration_sequences // self.calibration_batch


QUICK = LlamaPruneSetup(
    model=LMSetup(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=16,
                  batch_size=4, steps=4, warmup=1, eval_batches=2, corpus_bytes=50_000),
    calibration_sequences=8, num_grads=4, mfac_recompute_steps=2,
)  # fmt: skip


def lm_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of a Hugging Face causal LM's output."""
    return nn.functional.cross_entropy(outputs.logits.flatten(0, 1), targets.flatten())


def _cache_key(setup: LlamaPruneSetup) -> str:
    import transformers

    versions = (sys.version_info[:2], torch.__version__, transformers.__version__)
    text = repr((asdict(setup.model), setup.lr, versions))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trained_llama(
    setup: LlamaPruneSetup,
    corpus: TextCorpus,
    *,
    cache_dir: str | Path | None = "runs/cache",
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], float]:
    """The dense model's ``state_dict`` and its training seconds: trained with AdamW, or loaded.

    Warm-up and cosine learning rate over ``setup.model.steps`` steps. With a
    ``cache_dir`` the weights are saved there after training (one file per
    setup, Python, torch and transformers version) and loaded on later calls.
    """
    path = None if cache_dir is None else Path(cache_dir) / f"tiny_llama_{_cache_key(setup)}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state_dict"], float(saved["train_seconds"])
    model = new_model(corpus, setup.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(setup.model))
    generator = torch.Generator().manual_seed(setup.seed + 1)
    start = time.perf_counter()
    for _ in progress(range(setup.model.steps), desc="training the Llama", enabled=show_progress):
        train_step(model, optimizer, corpus, setup.model, generator)
        scheduler.step()
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, "train_seconds": seconds}, path)
    return state, seconds


def calibration_data(
    setup: LlamaPruneSetup, corpus: TextCorpus
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``calibration_sequences`` random windows of training text, as ``(inputs, targets)`` batches."""
    generator = torch.Generator().manual_seed(setup.seed + 2)
    return [
        corpus.batch("train", setup.calibration_batch, setup.model.seq_len, generator)
        for _ in range(setup.calibration_batches)
    ]


def prunable_weights(model: nn.Module) -> list[str]:
    """The attention and MLP matrices: every linear layer's weight but the output layer's."""
    return [f"{name}.weight" for name in matrix_layers(model)]


MethodBuilder = Callable[[nn.Module, list, LlamaPruneSetup, bool], Pruner]


def _mfac(scope: Scope) -> MethodBuilder:
    def build(model, data, setup, show_progress):
        return MFACPruner(
            model, lm_loss, data, params=prunable_weights(model), num_grads=setup.num_grads,
            block_size=setup.block_size, relative_damp=setup.mfac_relative_damp, scope=scope,
            progress=show_progress,
        )  # fmt: skip

    return build


def _one_sequence_each(data: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration batches cut into batches of one sequence: one M-FAC gradient each."""
    return [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(x.shape[0])]


def _mfac_joint(scope: Scope) -> MethodBuilder:
    def build(model, data, setup, show_progress):
        sequences = _one_sequence_each(data)
        return MFACPruner(
            model, lm_loss, sequences, params=prunable_weights(model), num_grads=len(sequences),
            block_size=setup.block_size, relative_damp=setup.joint_relative_damp, scope=scope,
            progress=show_progress, update="joint", rounds=setup.joint_rounds,
        )  # fmt: skip

    return build


#: name -> pruner builder: ``build(model, calibration data, setup, show_progress)``
METHODS: dict[str, MethodBuilder] = {
    "magnitude (layer)": lambda m, d, s, p: MagnitudePruner(
        m, params=prunable_weights(m), scope="layer"
    ),
    "magnitude (global)": lambda m, d, s, p: MagnitudePruner(m, params=prunable_weights(m)),
    "Wanda": lambda m, d, s, p: WandaPruner(m, d, params=prunable_weights(m), progress=p),
    "SparseGPT": lambda m, d, s, p: SparseGPTPruner(
        m, d, params=prunable_weights(m), block_size=s.block_size, progress=p
    ),
    "M-FAC (global)": _mfac("global"),
    "M-FAC (layer)": _mfac("layer"),
    "M-FAC joint (global)": _mfac_joint("global"),
    "M-FAC joint (layer)": _mfac_joint("layer"),
}


def _gptq(model: nn.Module, data: list, setup: LlamaPruneSetup, show_progress: bool) -> float:
    GPTQQuantizer(
        model, data, bits=4, group_size=128, params=prunable_weights(model),
        block_size=setup.block_size, progress=show_progress,
    ).quantize()  # fmt: skip
    return 0.0


def _sparsegpt_4bit(
    model: nn.Module, data: list, setup: LlamaPruneSetup, show_progress: bool
) -> float:
    pruner = SparseGPTPruner(
        model, data, params=prunable_weights(model), block_size=setup.block_size,
        progress=show_progress,
    )  # fmt: skip
    return pruner.prune(0.5, bits=4, group_size=128)


Quantization = Callable[[nn.Module, list, LlamaPruneSetup, bool], float]

#: name -> (what it does, as the ``pattern`` of its run; ``compress(model, calibration data,
#: setup, show_progress)``, which compresses in place and returns the sparsity reached):
#: 4-bit asymmetric grids of 128 input columns
QUANTIZATIONS: dict[str, tuple[str, Quantization]] = {
    "GPTQ": ("4-bit g128", _gptq),
    "SparseGPT + GPTQ": ("50% + 4-bit g128", _sparsegpt_4bit),
}


@dataclass(frozen=True)
class PruneRun:
    """One ``prune()`` call on a copy of the dense model."""

    method: str
    pattern: str
    loss: float  # held-out, nats/byte
    sparsity: float
    seconds: float
    peak_bytes: int | None


def prune_once(
    state: dict[str, torch.Tensor],
    setup: LlamaPruneSetup,
    corpus: TextCorpus,
    method: str,
    pattern: str,
    *,
    show_progress: bool = False,
) -> PruneRun:
    """Prune a fresh copy of the dense model with ``method`` to ``pattern``; time it, measure its peak memory.

    ``method`` is one of :data:`METHODS` (``pattern`` one of :data:`PATTERNS`) or of
    :data:`QUANTIZATIONS` (``pattern`` the one it names).
    """
    model = new_model(corpus, setup.model)
    model.load_state_dict(state)
    data = calibration_data(setup, corpus)
    if method in QUANTIZATIONS:
        if pattern != QUANTIZATIONS[method][0]:
            raise ValueError(f"{method} does {QUANTIZATIONS[method][0]!r}, not {pattern!r}")
        compress = QUANTIZATIONS[method][1]
        with measured(next(model.parameters()).device) as measurement:
            sparsity = compress(model, data, setup, show_progress)
    else:
        pruner = METHODS[method](model, data, setup, show_progress)
        options = dict(PATTERNS[pattern])
        if method.startswith("M-FAC") and setup.mfac_recompute_steps is not None:
            options["recompute_steps"] = setup.mfac_recompute_steps
        with measured(next(model.parameters()).device) as measurement:
            sparsity = pruner.prune(**options)
    loss = validation_loss(model, corpus, setup.model)
    return PruneRun(method, pattern, loss, sparsity, measurement.seconds, measurement.peak_bytes)


@dataclass
class LlamaComparison:
    """Every method at every pattern, the quantizations, and the dense model."""

    setup: LlamaPruneSetup
    dense_loss: float
    train_seconds: float
    runs: list[PruneRun]
    quantized: list[PruneRun] = field(default_factory=list)

    def loss_table(self, bold: bool = True) -> tuple[list[str], list[list[str]]]:
        """Held-out loss, one row per method, one column per pattern (markdown bold on the best of each)."""
        patterns = list(dict.fromkeys(r.pattern for r in self.runs))
        best = {p: min(r.loss for r in self.runs if r.pattern == p) for p in patterns}
        rows = []
        for method in dict.fromkeys(r.method for r in self.runs):
            cells = [method]
            for p in patterns:
                run = next(r for r in self.runs if r.method == method and r.pattern == p)
                text = f"{run.loss:.3f}"
                cells.append(f"**{text}**" if bold and run.loss == best[p] else text)
            rows.append(cells)
        return ["method", *patterns], rows

    def detail_table(self) -> tuple[list[str], list[list[str]]]:
        """One row per pruning call: loss, sparsity reached, wall time, peak memory."""
        header = ["method", "pattern", "held-out loss", "sparsity", "prune time (s)", "peak memory"]
        rows = [
            [r.method, r.pattern, f"{r.loss:.3f}", f"{r.sparsity:.3f}", f"{r.seconds:.1f}",
             "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f} MiB"]
            for r in [*self.runs, *self.quantized]
        ]  # fmt: skip
        return header, rows

    def quantization_table(self) -> tuple[list[str], list[list[str]]]:
        """Held-out loss of each quantization, with the dense model's."""
        rows = [["dense", "float32", f"{self.dense_loss:.3f}"]]
        rows += [[r.method, r.pattern, f"{r.loss:.3f}"] for r in self.quantized]
        return ["method", "weights", "held-out loss"], rows

    def describe(self) -> str:
        m = self.setup.model
        return (
            f"a {m.num_layers}-layer Llama (hidden {m.hidden_size}, intermediate "
            f"{m.intermediate_size}) trained for {m.steps} AdamW steps of {m.batch_size} x "
            f"{m.seq_len} bytes ({self.train_seconds:.0f} s), dense held-out loss "
            f"{self.dense_loss:.3f} nats/byte; calibration {self.setup.calibration_sequences} "
            f"training sequences; evaluation {m.eval_batches} x {m.batch_size} held-out windows"
        )


def compare(
    setup: LlamaPruneSetup,
    *,
    methods: Sequence[str] | None = None,
    patterns: Sequence[str] | None = None,
    cache_dir: str | Path | None = "runs/cache",
    show_progress: bool = True,
    quantizations: Sequence[str] | None = None,
    run: Callable[..., PruneRun] | None = None,
) -> LlamaComparison:
    """Train (or load) the dense model; prune a copy with every method at every pattern,
    and compress one with each of ``quantizations`` (``None``: all of :data:`QUANTIZATIONS`).

    ``run(state, setup, corpus, method, pattern)`` does one call
    (:func:`prune_once` in this process by default; the benchmark runs each in a
    fresh process).
    """
    corpus = load_stdlib_corpus(setup.model.corpus_bytes)
    state, train_seconds = trained_llama(
        setup, corpus, cache_dir=cache_dir, show_progress=show_progress
    )
    dense = new_model(corpus, setup.model)
    dense.load_state_dict(state)
    dense_loss = validation_loss(dense, corpus, setup.model)
    if run is None:
        run = partial(prune_once, show_progress=show_progress)
    runs = [
        run(state, setup, corpus, method, pattern)
        for method in methods or METHODS
        for pattern in patterns or PATTERNS
    ]
    quantized = [
        run(state, setup, corpus, method, QUANTIZATIONS[method][0])
        for method in (QUANTIZATIONS if quantizations is None else quantizations)
    ]
    return LlamaComparison(setup, dense_loss, train_seconds, runs, quantized)


def plot_losses(comparison: LlamaComparison, path: Path) -> Path | None:
    """Held-out loss of every method at every pattern, bars grouped by pattern; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    patterns = list(dict.fromkeys(r.pattern for r in comparison.runs))
    methods = list(dict.fromkeys(r.method for r in comparison.runs))
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for i, method in enumerate(methods):
        losses = [
            next(r.loss for r in comparison.runs if r.method == method and r.pattern == p)
            for p in patterns
        ]
        positions = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(patterns))]
        axes.bar(positions, losses, width, label=method, color=f"C{i}")
    axes.axhline(comparison.dense_loss, color="grey", lw=1, ls="--", label="dense")
    axes.set_xticks(range(len(patterns)), patterns)
    lowest = min(comparison.dense_loss, *(r.loss for r in comparison.runs))
    axes.set_ylim(bottom=0.95 * lowest)  # the bars' differences, not their common part
    axes.set(
        title="Tiny Llama pruned one-shot",
        xlabel="sparsity of the attention and MLP matrices",
        ylabel="held-out loss (nats/byte)",
    )
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_text(comparison: LlamaComparison) -> str:
    """The markdown written by ``secondorder prune --models llama`` and the demo."""
    return (
        f"One `prune()` call per method and pattern on {comparison.describe()}. Magnitude "
        "per layer or ranked globally; Wanda and SparseGPT per layer (blocks of "
        f"{comparison.setup.block_size} columns); M-FAC OBS with {comparison.setup.num_grads} "
        f"gradients of {comparison.setup.calibration_batch} sequence(s) each, blocks of "
        f"{comparison.setup.block_size}, relative damping {comparison.setup.mfac_relative_damp:g}, "
        "ranked globally or per layer. Held-out loss in "
        "nats/byte (best of each column in bold):\n\n"
        + markdown_table(*comparison.loss_table())
        + _quantization_text(comparison)
        + "\n\nEach call (peak memory: growth of the process's peak resident set, or "
        "of the CUDA allocator's peak, during the call):\n\n"
        + markdown_table(*comparison.detail_table())
    )


def _quantization_text(comparison: LlamaComparison) -> str:
    if not comparison.quantized:
        return ""
    return (
        "\n\nQuantized: GPTQ to 4 bits (asymmetric min-max grids of 128 input columns, "
        "1% damping), and SparseGPT pruning to 50% while quantizing the kept weights to "
        "the same grids in one sweep. Held-out loss in nats/byte:\n\n"
        + markdown_table(*comparison.quantization_table())
    )


__all__ = [
    "METHODS",
    "PATTERNS",
    "QUANTIZATIONS",
    "QUICK",
    "TITLE",
    "LlamaComparison",
    "LlamaPruneSetup",
    "PruneRun",
    "calibration_data",
    "compare",
    "lm_loss",
    "plot_losses",
    "prunable_weights",
    "prune_once",
    "report_text",
    "trained_llama",
]
