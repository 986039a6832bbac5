"""Demo section: AdamW against the low-rank optimisers, pretraining a tiny Llama on Python's own code.

A byte-level language model (a randomly initialised ``LlamaForCausalLM``) trained for a
fixed number of steps on the text of the standard library; every optimiser starts from
the same weights and sees the same batches. The low-rank methods project the attention
and MLP matrices at the same rank; embeddings, norms and the output layer are AdamW in
all of them, as in GaLore.
"""

from __future__ import annotations

import torch

from .._workloads.data import load_stdlib_corpus
from .._workloads.language_model import (
    QUICK,
    Builder,
    LMResult,
    LMSetup,
    low_rank_groups,
    matrix_layers,
    train_lm,
)
from .._workloads.report import Report, markdown_table, plot_curves, text_table
from ..nn import to_spectral
from ..optim import SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

TITLE = "Low-rank optimisers pretraining a tiny Llama on the standard library"


def _adamw(model, setup, lr):
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _galore(model, setup, lr, cls=GaLoreAdamW, **extra):
    settings = {"rank": setup.rank, "update_proj_gap": setup.update_proj_gap, "scale": 1.0}
    return model, cls(low_rank_groups(model, **settings, **extra), lr=lr)


def _dct(model, setup, lr):
    return model, DCTAdamW(low_rank_groups(model, rank=setup.rank), lr=lr)


def _sst(model, setup, lr):
    model = to_spectral(model, setup.rank, modules=matrix_layers(model))
    return model, SST(model, lr=lr, update_proj_gap=setup.update_proj_gap)


#: name -> (builder, learning rate); the rates are the best of the sweep in docs/benchmarks.md
OPTIMIZERS: dict[str, tuple[Builder, float]] = {
    "AdamW": (_adamw, 1e-3),
    "GaLoreAdamW": (_galore, 3e-3),
    "NaturalGaLore": (lambda m, s, lr: _galore(m, s, lr, NaturalGaLore), 3e-3),
    "DCTAdamW": (_dct, 3e-3),
    "SST": (_sst, 1e-2),
}


def compare(
    setup: LMSetup,
    *,
    optimizers: dict[str, tuple[Builder, float]] | None = None,
    show_progress: bool = True,
) -> list[LMResult]:
    corpus = load_stdlib_corpus(setup.corpus_bytes)
    chosen = OPTIMIZERS if optimizers is None else optimizers
    return [
        train_lm(name, build, lr, corpus, setup, show_progress=show_progress)
        for name, (build, lr) in chosen.items()
    ]


def results_table(results: list[LMResult]) -> tuple[list[str], list[list[str]]]:
    adamw = next((r for r in results if r.name == "AdamW"), None)
    header = ["optimiser", "lr", "valid loss (nats/byte)", "tokens/s", "optimiser state"]
    rows = []
    for r in results:
        ratio = (
            f" ({r.state_bytes / adamw.state_bytes:.2f}x AdamW)"
            if adamw and adamw.state_bytes
            else ""
        )
        rows.append(
            [r.name, f"{r.lr:g}", f"{r.valid_loss:.3f}", f"{r.tokens_per_second:,.0f}",
             f"{r.state_bytes / 2**20:.2f} MiB{ratio}"]
        )  # fmt: skip
    return header, rows


def run(report: Report, *, quick: bool, show_progress: bool) -> None:
    setup = QUICK if quick else LMSetup()
    results = compare(setup, show_progress=show_progress)
    header, rows = results_table(results)
    print(f"\n{TITLE} ({setup.steps} steps of {setup.tokens_per_step} bytes, rank {setup.rank})")
    print(text_table(header, rows))
    figure = plot_curves(
        {r.name: r.step_losses for r in results},
        report.out / "lowrank_loss_curves.png",
        title="Training loss, tiny Llama on the standard library",
        xlabel="step",
        ylabel="cross-entropy (nats/byte, running mean of 20 steps)",
        smooth=20,
    )
    report.section(
        TITLE,
        f"A {setup.num_layers}-layer Llama (hidden {setup.hidden_size}) trained for "
        f"{setup.steps} steps of {setup.batch_size} x {setup.seq_len} bytes of the standard "
        f"library's source, warm-up then cosine learning rate; the attention and MLP matrices "
        f"at rank {setup.rank} (refreshed every {setup.update_proj_gap} steps for GaLore and SST, "
        f"every step for DCT-AdamW). Validation loss on held-out text; optimiser state counted "
        f"from the state tensors.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + report.figure(figure, "training loss"),
    )


__all__ = ["OPTIMIZERS", "TITLE", "compare", "results_table", "run"]
