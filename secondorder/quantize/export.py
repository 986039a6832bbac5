"""Saving a quantized Hugging Face model in the ``compressed-tensors`` format.

``compressed-tensors`` (the vLLM project's package, an optional extra here:
``pip install 'secondorder[export]'``) stores integer weights packed eight 4-bit codes to
an ``int32`` (``"pack-quantized"``), with a scale per output row and group of input
columns and, for asymmetric grids, packed zero points; ``config.json`` gains a
``quantization_config`` that names the scheme of each layer. Its dequantization is
``scale · (q − z)`` with codes ``q`` and zero points ``z`` in ``[−2^(b−1), 2^(b−1) − 1]``;
a :class:`~secondorder.quantize.QuantizedWeight` holds unsigned codes ``c`` and zero
points ``z'`` in ``[0, 2^b − 1]`` with ``scale · (c − z')``, so both are shifted by
``2^(b−1)`` and every weight dequantizes to the same number.

What the format (0.20.1) cannot hold, refused before anything is written:

- act-order with groups (``act_order=True`` and a ``group_size``): a column's group then
  follows the quantization order, which needs a group index per column
  (``actorder="group"``), removed from ``compressed-tensors`` after 0.14; act-order with
  one grid per row (``group_size=-1``) is saved;
- a group size that does not divide the number of input columns;
- sparsity as such: 0.20.1 has no sparse compressor, so a pruned and quantized weight is
  saved with its zeros as codes (exactly, since ``0 = scale · (z − z)``).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..prune.targets import check_masks_removed
from .grid import QuantizedWeight

__all__ = ["save_compressed"]


def save_compressed(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    save_directory: str | os.PathLike[str],
) -> None:
    """Save ``model`` with ``quantized``'s weights in the ``compressed-tensors`` format.

    ``model`` is a Hugging Face ``PreTrainedModel`` whose weights ``quantized`` describes
    (what :meth:`~secondorder.quantize.GPTQQuantizer.quantize` or
    ``SparseGPTPruner.prune(..., bits=b)`` returned, the masks made permanent). It is not
    changed: a copy is compressed and saved with ``save_pretrained``, then the copy's
    ``config.json`` gains the quantization config. The format keeps the scales in the
    weights' dtype: a float32 checkpoint holds exactly the records' weights, a half
    precision one the same codes with scales rounded to that dtype (bfloat16: 2⁻⁸
    relative). Symmetric grids load back with
    ``transformers.AutoModelForCausalLM.from_pretrained(save_directory)`` (with
    ``compressed-tensors`` installed) to those weights. Asymmetric ones are written in
    the same format, but ``transformers`` with ``compressed-tensors`` 0.20.1 cannot read
    their packed zero points back (its loader allocates them unpacked), so a warning
    says so.

    Args:
        model: the quantized model (``save_pretrained``, weights on their grids).
        quantized: ``{"<module>.weight": QuantizedWeight}``, each of an ``nn.Linear``.
        save_directory: where the model is written.

    Raises:
        ImportError: ``compressed-tensors`` is not installed.
        ValueError: before anything is written, if the model still holds pruning masks,
            a name is not an ``nn.Linear`` weight of ``model``, a weight is not the one
            its record dequantizes to, a record has act-order with groups, or a group
            size does not divide the weight's columns.
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "saving in the compressed-tensors format needs its package: "
            "pip install 'secondorder[export]'"
        ) from error
    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"save_compressed saves a Hugging Face model (save_pretrained); got {type(model).__name__}"
        )
    if not quantized:
        raise ValueError("no quantized weights to save: quantize the model first")
    check_masks_removed(model)
    schemes: dict[tuple[int, int, bool], list[str]] = {}
    for name, record in quantized.items():
        module_name = _checked_module(model, name, record)
        key = (record.bits, record.group_size, record.symmetric)
        schemes.setdefault(key, []).append(module_name)

    saved = copy.deepcopy(model)
    config_groups = {
        f"group_{index}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(
                num_bits=bits,
                type="int",
                symmetric=symmetric,
                strategy="channel" if group_size == -1 else "group",
                group_size=None if group_size == -1 else group_size,
            ),
        )
        for index, ((bits, group_size, symmetric), names) in enumerate(schemes.items())
    }
    apply_quantization_config(saved, QuantizationConfig(config_groups=config_groups))
    with torch.no_grad():
        for name, record in quantized.items():
            _write_grid(saved.get_submodule(name.removesuffix(".weight")), record)
    compressor = ModelCompressor.from_pretrained_model(saved, quantization_format="pack-quantized")
    compressor.compress_model(saved)
    saved.save_pretrained(save_directory)  # type: ignore[operator]
    compressor.update_config(os.fspath(save_directory))
    if any(not symmetric for _, _, symmetric in schemes):
        warnings.warn(
            "saved asymmetric grids (packed zero points): transformers' from_pretrained with "
            "compressed-tensors 0.20.1 cannot load them back; quantize with symmetric=True "
            "for a checkpoint transformers reads",
            UserWarning,
            stacklevel=2,
        )


def _checked_module(model: nn.Module, name: str, record: QuantizedWeight) -> str:
    """The name of the ``nn.Linear`` whose weight ``name`` is, after checking that the
    weight is what ``record`` stands for and that the format can hold ``record``."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if attribute != "weight" or not isinstance(module, nn.Linear):
        raise ValueError(f"{name!r} is not the weight of an nn.Linear of the model")
    cols = module.weight.shape[1]
    if record.perm is not None and record.group_size not in (-1, cols):
        raise ValueError(
            f"{name} was quantized with act_order and groups of {record.group_size}: its groups "
            "follow the quantization order, which compressed-tensors (since 0.15) cannot store; "
            "quantize with act_order=False, or group_size=-1"
        )
    if record.group_size != -1 and cols % record.group_size:
        raise ValueError(
            f"{name} has {cols} input columns, not a multiple of its group size "
            f"{record.group_size}, which compressed-tensors requires"
        )
    if not torch.equal(record.dequantize().to(module.weight.dtype), module.weight.detach()):
        raise ValueError(
            f"the weight {name} is not the one its record dequantizes to: was the model changed "
            "after it was quantized, or is the record another model's?"
        )
    return module_name


def _write_grid(module: Any, record: QuantizedWeight) -> None:
    """``record``'s scales and zero points into the parameters ``compressed-tensors`` gave
    ``module``, zero points shifted to its signed range."""
    module.weight_scale.copy_(
        record.scales.to(module.weight_scale.dtype).reshape_as(module.weight_scale)
    )
    zero_point = getattr(module, "weight_zero_point", None)
    if zero_point is not None:
        shifted = record.zeros.to(torch.int16) - 2 ** (record.bits - 1)
        zero_point.copy_(shifted.to(zero_point.dtype).reshape_as(zero_point))
