"""Progress bars that appear when tqdm is installed (the ``examples`` extra) and stay silent otherwise.

The library's one policy: a function that runs a long loop of its own (an estimator's
products, a pruner's steps, a pass over the data) takes ``progress: bool = True``; an
operator's product, which those loops call many times, takes ``progress=False`` by
default, so bars are never nested and never flicker.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T] | Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar if ``enabled`` and tqdm is importable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
