"""Helpers shared across the package."""

from collections import UserDict, namedtuple

import torch

from secondorder._common import to_device

Pair = namedtuple("Pair", ["first", "second"])


class Batch(UserDict):
    """A UserDict subclass, as transformers' BatchEncoding is."""


def test_to_device_reaches_tensors_in_user_dicts_and_named_tuples_keeping_their_types():
    t = torch.ones(2)
    value = {"a": [t, (t, 1)], "b": Batch({"ids": t, "pair": Pair(t, "x")})}
    moved = to_device(value, torch.device("meta"))
    assert type(moved["b"]) is Batch and type(moved["b"]["pair"]) is Pair
    assert type(moved["a"][1]) is tuple and moved["a"][1][1] == 1
    assert moved["b"]["pair"].second == "x"
    tensors = [moved["a"][0], moved["a"][1][0], moved["b"]["ids"], moved["b"]["pair"].first]
    assert all(x.device.type == "meta" for x in tensors)
