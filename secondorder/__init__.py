"""secondorder: second-order information for PyTorch.

Subpackages (imported on demand, so ``import secondorder`` stays cheap):

- :mod:`secondorder.kernels`      the hot loops (Triton) and their plain-torch twins
- :mod:`secondorder.curvature`    operators and estimators (M-FAC, Hutchinson, Lanczos, ...)
- :mod:`secondorder.optim`        ``torch.optim`` optimizers built on them
- :mod:`secondorder.prune`        OBS pruning on the M-FAC inverse, SparseGPT, Wanda
- :mod:`secondorder.quantize`     GPTQ on the layer-wise OBS sweep of SparseGPT
- :mod:`secondorder.diagnostics`  curvature monitoring during training
"""

__version__ = "0.1.0.dev0"
