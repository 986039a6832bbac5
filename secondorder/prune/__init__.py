"""Pruning: Optimal Brain Surgeon on the M-FAC inverse Fisher, SparseGPT, Wanda, magnitude, schedules.

``MFACPruner`` and ``MagnitudePruner`` rank weights over the whole model (or per
layer); ``SparseGPTPruner`` and ``WandaPruner`` prune ``nn.Linear`` layers one
block after another from their inputs on calibration data. All four share
:class:`Pruner`: the same ``prune(sparsity)`` / ``prune(n_m=(2, 4))`` call, masks,
and restore-on-error behaviour.

Masks are kept as ``torch.nn.utils.prune`` keeps them, so ``prune.remove`` makes
them permanent and ``model.state_dict()`` saves them.
"""

from .layerwise import LayerwisePruner
from .masks import count_to_prune, prune_lowest, prune_lowest_per_row, prune_n_m
from .obs import obs_saliency, obs_update, relative_damping
from .pruners import MagnitudePruner, MFACPruner, Pruner
from .schedules import SparsitySchedule, cubic_sparsity_schedule
from .sparsegpt import SparseGPTPruner, sparsegpt_prune
from .targets import apply_masks, keep_masks_applied, load_pruned_state_dict
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
    "sparsegpt_prune",
    "wanda_scores",
]
