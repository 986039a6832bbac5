"""Quantization: GPTQ on the layer-wise Optimal Brain Surgeon sweep that SparseGPT uses.

``GPTQQuantizer`` rounds the ``nn.Linear`` weights of a model onto uniform integer
grids (per output row, or per group of input columns), one block after another from
their inputs on calibration data, the rounding error of each column compensated by
the columns not yet quantized. The codes and grids of each weight are kept as
:class:`QuantizedWeight` records. Pruning and quantizing in one sweep is
``SparseGPTPruner.prune(..., bits=4)``. :func:`save_compressed` writes a quantized Hugging
Face model in the ``compressed-tensors`` format.
"""

from .export import save_compressed
from .gptq import GPTQQuantizer, act_order_permutation, gptq_quantize
from .grid import GroupQuantizer, QuantizedWeight, dequantize_codes, minmax_grid, round_to_grid

__all__ = [
    "GPTQQuantizer",
    "GroupQuantizer",
    "QuantizedWeight",
    "act_order_permutation",
    "dequantize_codes",
    "gptq_quantize",
    "minmax_grid",
    "round_to_grid",
    "save_compressed",
]
