"""Pretrain a tiny Llama on Python's own source with each low-rank optimiser as a drop-in.

    python examples/pretrain_tiny_llama.py                  # every optimiser, then the Trainer
    python examples/pretrain_tiny_llama.py --steps 100 --optimizers GaLoreAdamW SST

Part 1 swaps the optimiser of a plain training loop: AdamW, GaLoreAdamW, NaturalGaLore,
DCTAdamW and SST (after ``to_spectral``), each from the same initial weights. Part 2
hands GaLoreAdamW to a ``transformers.Trainer`` through ``optimizers=(optimizer, None)``
(the Trainer needs the ``accelerate`` package). About two minutes on two CPU cores;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from secondorder._workloads.data import load_stdlib_corpus
from secondorder._workloads.models import tiny_llama
from secondorder.nn import to_spectral
from secondorder.optim import SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

RANK = 32


def linear_layers(model: nn.Module) -> list[str]:
    """The attention and MLP projections: every nn.Linear but the output layer."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def galore_groups(model: nn.Module, **low_rank: object) -> list[dict]:
    """GaLore's convention: the matrices in a group with ``rank``, everything else plain AdamW."""
    names = set(linear_layers(model))
    matrices = [m.weight for n, m in model.named_modules() if n in names]
    others = [p for p in model.parameters() if all(p is not q for q in matrices)]
    return [{"params": others}, {"params": matrices, **low_rank}]


def make_optimizer(name: str, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    if name == "AdamW":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    if name == "GaLoreAdamW":
        groups = galore_groups(model, rank=RANK, update_proj_gap=50, scale=1.0)
        return model, GaLoreAdamW(groups, lr=3e-3)
    if name == "NaturalGaLore":
        groups = galore_groups(model, rank=RANK, update_proj_gap=50, scale=1.0)
        return model, NaturalGaLore(groups, lr=3e-3, history=20)
    if name == "DCTAdamW":
        return model, DCTAdamW(galore_groups(model, rank=RANK), lr=3e-3)
    if name == "SST":  # the memory-saving mode: the linear layers become their SVD
        model = to_spectral(model, rank=RANK, modules=linear_layers(model))
        return model, SST(model, lr=1e-2, update_proj_gap=50)
    raise ValueError(f"unknown optimiser {name!r}")


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4)


def plain_loop(name: str, corpus, steps: int) -> None:
    model, optimizer = make_optimizer(name, new_model())
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets = corpus.batch("train", 16, 128, generator)
        optimizer.zero_grad()
        logits = model(input_ids=inputs).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        warmup.step()
        if step == 1 or step % 20 == 0 or step == steps:
            print(f"  {name:>13}  step {step:4d}  loss {loss.item():.3f}")
    print(f"  {name:>13}  {time.perf_counter() - start:.1f} s")


class Windows(torch.utils.data.Dataset):
    """Fixed windows of the corpus as causal-LM examples (the model shifts the labels)."""

    def __init__(self, tokens: torch.Tensor, length: int) -> None:
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[index * self.length : (index + 1) * self.length]
        return {"input_ids": window, "labels": window}


def with_trainer(corpus, steps: int) -> None:
    try:
        import accelerate  # noqa: F401  (the Trainer requires it)
        from transformers import Trainer, TrainingArguments
    except ImportError as error:
        print(f"  skipped: the transformers Trainer needs accelerate ({error})")
        return
    model, optimizer = make_optimizer("GaLoreAdamW", new_model())
    arguments = TrainingArguments(
        output_dir="runs/pretrain_tiny_llama",
        max_steps=steps,
        per_device_train_batch_size=16,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Windows(corpus.train, 128),
        optimizers=(optimizer, None),  # our optimiser; the Trainer makes its default scheduler
    )
    result = trainer.train()
    print(f"  GaLoreAdamW in the Trainer: final training loss {result.training_loss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["AdamW", "GaLoreAdamW", "NaturalGaLore", "DCTAdamW", "SST"],
    )
    parser.add_argument("--no-trainer", action="store_true")
    args = parser.parse_args()
    corpus = load_stdlib_corpus(1_000_000)
    print(f"{len(corpus.train):,} training bytes from {len(corpus.files)} standard-library modules")
    print("\n1. A plain training loop, one optimiser after the other:")
    for name in args.optimizers:
        plain_loop(name, corpus, args.steps)
    if not args.no_trainer:
        print("\n2. The transformers Trainer with optimizers=(GaLoreAdamW(...), None):")
        with_trainer(corpus, args.steps)


if __name__ == "__main__":
    main()
