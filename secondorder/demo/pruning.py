"""Demo section and ``secondorder prune``: OBS on the M-FAC inverse against magnitude pruning
on the digits models, then the tiny Llama pruned by every pruner (the workflows are in
:mod:`secondorder._workloads.digits_pruning` and :mod:`secondorder._workloads.llama_pruning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._workloads import llama_pruning as llm_pruning
from .._workloads.digits_pruning import Comparison, compare, plot_sparsity_accuracy
from .._workloads.llama_pruning import QUICK, LlamaComparison, LlamaPruneSetup
from .._workloads.llama_pruning import TITLE as LLAMA_TITLE
from .._workloads.report import Report, markdown_table, text_table

TITLE = "Pruning: OBS on the M-FAC inverse against magnitude"


def prune_digits(
    kinds: Sequence[str],
    sparsities: Sequence[float],
    *,
    out: str | Path = "runs/prune",
    gradual_epochs: int = 4,
    train_epochs: int = 30,
    show_progress: bool = True,
) -> list[Comparison]:
    """``secondorder prune``: compare M-FAC and magnitude on digits models; print and plot."""
    out = Path(out)
    comparisons = []
    for kind in kinds:
        c = compare(
            kind, sparsities, gradual_epochs=gradual_epochs, train_epochs=train_epochs,
            show_progress=show_progress,
        )  # fmt: skip
        print(f"\ndigits {kind}: dense test accuracy {c.dense_accuracy:.3f}")
        print(text_table(c.header(), c.rows()))
        comparisons.append(c)
    out.mkdir(parents=True, exist_ok=True)
    tables = [
        f"## digits {c.model}\n\ndense test accuracy {c.dense_accuracy:.3f}\n\n"
        + markdown_table(c.header(), c.rows())
        for c in comparisons
    ]
    (out / "table.md").write_text("\n\n".join(tables) + "\n")
    print(f"\ntable written to {out / 'table.md'}")
    figure = plot_sparsity_accuracy(comparisons, out / "sparsity_accuracy.png")
    print(f"plot written to {figure}" if figure else "(no plot: install matplotlib)")
    return comparisons


def run(report: Report, *, quick: bool, show_progress: bool) -> None:
    sparsities = [0.5, 0.9] if quick else [0.5, 0.7, 0.8, 0.9, 0.95]
    kinds = ["mlp"] if quick else ["mlp", "cnn"]
    # quick: a smoke run in seconds, with fewer gradients and steps than the defaults
    mfac_options = {"num_grads": 16, "recompute_steps": 4} if quick else None
    comparisons = [
        compare(
            kind, sparsities, gradual_epochs=(1 if quick else 4) if kind == "mlp" else 0,
            train_epochs=3 if quick else 30, mfac_options=mfac_options,
            show_progress=show_progress,
        )
        for kind in kinds
    ]  # fmt: skip
    body = []
    for c in comparisons:
        print(f"\n{TITLE}: digits {c.model}, dense test accuracy {c.dense_accuracy:.3f}")
        print(text_table(c.header(), c.rows()))
        body.append(
            f"**digits {c.model}** (dense test accuracy {c.dense_accuracy:.3f})\n\n"
            + markdown_table(c.header(), c.rows())
        )
    figure = plot_sparsity_accuracy(comparisons, report.out / "pruning.png")
    report.section(
        TITLE,
        "Test accuracy of copies of a trained model pruned to each sparsity (fraction of the "
        "weights of linear and convolution layers set to zero). One-shot: one `prune()` call, "
        "default settings, no fine-tuning. Gradual: the cubic schedule during a few epochs of "
        "fine-tuning.\n\n"
        + "\n\n".join(body)
        + "\n\n"
        + report.figure(figure, "sparsity against accuracy"),
    )
    run_llama(report, quick=quick, show_progress=show_progress)


def run_llama(report: Report, *, quick: bool, show_progress: bool) -> None:
    """The second part of the section: the tiny Llama, M-FAC OBS against SparseGPT, Wanda, magnitude."""
    setup = llm_pruning.QUICK if quick else llm_pruning.LlamaPruneSetup()
    comparison = llm_pruning.compare(
        setup, cache_dir=None if quick else "runs/cache", show_progress=show_progress
    )
    print(f"\n{llm_pruning.TITLE}: {comparison.describe()}")
    print(text_table(*comparison.loss_table(bold=False)))
    figure = llm_pruning.plot_losses(comparison, report.out / "llama_pruning.png")
    report.section(
        llm_pruning.TITLE,
        llm_pruning.report_text(comparison)
        + "\n\n"
        + report.figure(figure, "held-out loss of the pruned Llama"),
    )


def prune_llama(
    *,
    out: str | Path = "runs/prune",
    quick: bool = False,
    cache_dir: str | Path | None = "runs/cache",
    show_progress: bool = True,
) -> LlamaComparison:
    """``secondorder prune --models llama``: run the comparison, print it, write the table and the plot."""
    out = Path(out)
    setup = QUICK if quick else LlamaPruneSetup()
    comparison = llm_pruning.compare(setup, cache_dir=cache_dir, show_progress=show_progress)
    print(f"\ntiny Llama: {comparison.describe()}")
    print(text_table(*comparison.loss_table(bold=False)))
    print()
    print(text_table(*comparison.quantization_table()))
    print()
    print(text_table(*comparison.detail_table()))
    out.mkdir(parents=True, exist_ok=True)
    table = out / "llama_pruning.md"
    table.write_text(f"# {LLAMA_TITLE}\n\n{llm_pruning.report_text(comparison)}\n")
    figure = llm_pruning.plot_losses(comparison, out / "llama_pruning.png")
    print(f"\ntable written to {table}")
    print(f"plot written to {figure}" if figure else "(no plot: install matplotlib)")
    return comparison
