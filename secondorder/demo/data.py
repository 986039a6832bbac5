"""Real data that ships inside installed packages: nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, count: int) -> Split:
        """The first ``count`` examples."""
        return Split(self.inputs[:count], self.targets[:count])

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """``(inputs, targets)`` mini-batches, shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield self.inputs[index], self.targets[index]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 1,797 handwritten 8x8 digits as ``[N, 1, 8, 8]`` images in [0, 1].

    The split is stratified and fixed by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data needs scikit-learn: pip install 'secondorder[examples]'"
        ) from error
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx])
