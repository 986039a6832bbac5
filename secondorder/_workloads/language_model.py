"""A byte-level language model trained on the standard library's own text: the tiny Llama
that the low-rank demo, the pruning comparison, the optimiser sweeps and the tests share.

A randomly initialised ``LlamaForCausalLM`` (built from a config: nothing downloaded), a
warm-up-then-cosine learning rate, and validation on held-out text in nats per byte.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._progress import progress
from .data import TextCorpus
from .models import tiny_llama
from .training import optimizer_state_bytes

__all__ = [
    "QUICK",
    "Builder",
    "LMResult",
    "LMSetup",
    "low_rank_groups",
    "matrix_layers",
    "new_model",
    "train_lm",
    "train_step",
    "validation_loss",
    "warmup_cosine",
]


@dataclass(frozen=True)
class LMSetup:
    """Model, data and budget of one comparison."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 300
    warmup: int = 30
    rank: int = 32
    update_proj_gap: int = 50
    eval_batches: int = 20
    corpus_bytes: int = 2_000_000
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


QUICK = LMSetup(hidden_size=32, num_layers=1, intermediate_size=64, seq_len=16, batch_size=2,
                steps=4, warmup=1, rank=4, update_proj_gap=2, eval_batches=1,
                corpus_bytes=50_000)  # fmt: skip


def matrix_layers(model: nn.Module) -> list[str]:
    """Names of the attention and MLP ``nn.Linear`` layers: every one but the output layer."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    ]


def low_rank_groups(model: nn.Module, **settings) -> list[dict]:
    """GaLore-style groups: the matrices of :func:`matrix_layers` with ``settings``, the rest plain."""
    names = set(matrix_layers(model))
    matrices = [m.weight for name, m in model.named_modules() if name in names]
    chosen = {id(p) for p in matrices}
    others = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": others}, {"params": matrices, **settings}]


Builder = Callable[[nn.Module, LMSetup, float], tuple[nn.Module, torch.optim.Optimizer]]


@dataclass
class LMResult:
    """What one training run produced."""

    name: str
    lr: float
    step_losses: list[float] = field(default_factory=list)
    valid_loss: float = float("nan")
    tokens_per_second: float = float("nan")
    seconds: float = float("nan")
    step_seconds: list[float] = field(default_factory=list)  # each step's wall time
    state_bytes: int = 0


@torch.no_grad()
def validation_loss(model: nn.Module, corpus: TextCorpus, setup: LMSetup) -> float:
    """Mean next-byte cross-entropy (nats) over fixed validation windows."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(setup.eval_batches):
        inputs, targets = corpus.batch("valid", setup.batch_size, setup.seq_len, generator)
        logits = model(input_ids=inputs).logits
        losses.append(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def new_model(corpus: TextCorpus, setup: LMSetup) -> nn.Module:
    """The tiny Llama of ``setup``, seeded: every optimiser starts from the same weights."""
    torch.manual_seed(setup.seed)
    return tiny_llama(
        corpus.vocab_size,
        setup.hidden_size,
        setup.num_layers,
        setup.num_heads,
        setup.intermediate_size,
        max_length=setup.seq_len,
    )


def warmup_cosine(setup: LMSetup) -> Callable[[int], float]:
    """The learning-rate factor of step ``step``: linear warm-up, then cosine down to 10%."""

    def schedule(step: int) -> float:
        if step < setup.warmup:
            return (step + 1) / setup.warmup
        done = (step - setup.warmup) / max(1, setup.steps - setup.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    return schedule


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: TextCorpus,
    setup: LMSetup,
    generator: torch.Generator,
) -> float:
    """One step of next-byte prediction on a fresh training batch; returns the loss."""
    inputs, targets = corpus.batch("train", setup.batch_size, setup.seq_len, generator)
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.item()


def train_lm(
    name: str,
    build: Builder,
    lr: float,
    corpus: TextCorpus,
    setup: LMSetup,
    *,
    show_progress: bool = True,
) -> LMResult:
    """Train a fresh tiny Llama with ``build``'s optimiser; warm-up then cosine learning rate."""
    model, optimizer = build(new_model(corpus, setup), setup, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(setup))
    generator = torch.Generator().manual_seed(setup.seed + 1)
    result = LMResult(name, lr)
    start = time.perf_counter()
    for _ in progress(range(setup.steps), desc=name, enabled=show_progress):
        step_start = time.perf_counter()
        result.step_losses.append(train_step(model, optimizer, corpus, setup, generator))
        scheduler.step()
        result.step_seconds.append(time.perf_counter() - step_start)
    result.seconds = time.perf_counter() - start
    result.tokens_per_second = setup.steps * setup.tokens_per_step / result.seconds
    result.valid_loss = validation_loss(model, corpus, setup)
    result.state_bytes = optimizer_state_bytes(optimizer)
    return result
