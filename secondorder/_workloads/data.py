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


@dataclass(frozen=True)
class TextCorpus:
    """A byte-level corpus: token ``i`` is the byte value ``i`` (a vocabulary of 256)."""

    train: torch.Tensor
    valid: torch.Tensor
    files: tuple[str, ...]
    vocab_size: int = 256

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``seq_len`` tokens and the same windows shifted by one."""
        data = {"train": self.train, "valid": self.valid}[split]
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]


def load_stdlib_corpus(num_bytes: int = 2_000_000, valid_fraction: float = 0.1) -> TextCorpus:
    """The text of the Python standard library's own top-level modules, as bytes.

    The files are the ``*.py`` directly in ``sysconfig.get_paths()['stdlib']``, read in
    sorted order and concatenated until ``num_bytes``; the last ``valid_fraction`` of that
    text is the validation split. The text (and so every number measured on it) depends
    on the Python version.
    """
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    text, used = bytearray(), []
    for path in sorted(root.glob("*.py")):
        if len(text) >= num_bytes:
            break
        text += path.read_bytes()
        used.append(path.name)
    if len(text) < num_bytes:
        raise ValueError(f"the standard library at {root} holds only {len(text)} bytes of *.py")
    tokens = torch.frombuffer(text[:num_bytes], dtype=torch.uint8).long()
    cut = int(num_bytes * (1 - valid_fraction))
    return TextCorpus(tokens[:cut], tokens[cut:], tuple(used))


def load_stdlib_prose(valid_fraction: float = 0.2) -> TextCorpus:
    """English prose that ships with Python: the reference manual's topics of ``pydoc``.

    The entries of ``pydoc_data.topics.topics`` (the text ``help("assert")`` shows), in
    sorted order, joined by blank lines and encoded as UTF-8: about 0.46 MB, none of it
    Python source, so none of it in :func:`load_stdlib_corpus`. The last
    ``valid_fraction`` is the validation split. The text depends on the Python version.

    Raises:
        ValueError: ``valid_fraction`` is not in (0, 1).
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics)).encode()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - valid_fraction))
    return TextCorpus(tokens[:cut], tokens[cut:], ("pydoc_data/topics.py",))
