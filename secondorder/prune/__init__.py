"""Pruning: Optimal Brain Surgeon on the M-FAC inverse Fisher, SparseGPT, Wanda, magnitude, schedules.

``MFACPruner`` and ``MagnitudePruner`` rank weights over the whole model (or per
layer); ``SparseGPTPruner`` and ``WandaPruner`` prune ``nn.Linear`` layers one
block after another from their inputs on calibration data. All four share
:class:`Pruner`: the same ``prune(sparsity)`` / ``prune(n_m=(2, 4))`` call, masks,
and restore-on-error behaviour.

To keep a pruned model, make its masks permanent before saving it:
``pruner.make_permanent()`` (or ``remove_masks(model)``) turns every
``weight_orig``/``weight_mask`` pair back into a plain ``weight``, so
``save_pretrained``/``from_pretrained`` and ``torch.save`` round-trip it;
:func:`check_masks_removed` raises before a model still holding masks is saved.
Until then masks are kept as ``torch.nn.utils.prune`` keeps them (gradual
pruning composes, ``load_pruned_state_dict`` reloads a masked checkpoint).

``n_m=(n, m)`` keeps ``n`` weights of every ``m`` (the SparseGPT and Wanda
reference code count the ``n`` removed).

The layer-wise pruners calibrate decoder layers sequentially (each block run on
the cached outputs of the one before, cost linear in depth) and take
``device=`` to prune a model one block at a time on an accelerator
(:mod:`.calibration`).
"""

from .layerwise import LayerwisePruner
from .masks import count_to_prune, prune_lowest, prune_lowest_per_row, prune_n_m
from .obs import obs_saliency, obs_update, relative_damping
from .pruners import MagnitudePruner, MFACPruner, Pruner
from .schedules import SparsitySchedule, cubic_sparsity_schedule
from .sparsegpt import SparseGPTPruner, sparsegpt_prune
from .targets import (
    apply_masks,
    check_masks_removed,
    keep_masks_applied,
    load_pruned_state_dict,
    remove_masks,
)
from .wanda import WandaPruner, wanda_scores

__all__ = [
    "LayerwisePruner",
    "MFACPruner",
    "MagnitudePruner",
    "Pruner",
    "SparseGPTPruner",
    "SparsitySchedule",
    "WandaPruner",
    "apply_masks",
    "check_masks_removed",
    "count_to_prune",
    "cubic_sparsity_schedule",
    "keep_masks_applied",
    "load_pruned_state_dict",
    "obs_saliency",
    "obs_update",
    "prune_lowest",
    "prune_lowest_per_row",
    "prune_n_m",
    "relative_damping",
    "remove_masks",
    "sparsegpt_prune",
    "wanda_scores",
]
