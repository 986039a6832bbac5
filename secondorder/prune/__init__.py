"""Pruning: Optimal Brain Surgeon on the M-FAC inverse Fisher, the magnitude baseline, schedules.

Masks are kept as ``torch.nn.utils.prune`` keeps them, so ``prune.remove`` makes
them permanent and ``model.state_dict()`` saves them.
"""

from .masks import count_to_prune, prune_lowest, prune_n_m
from .obs import obs_saliency, obs_update, relative_damping
from .pruners import MagnitudePruner, MFACPruner, Pruner
from .schedules import SparsitySchedule, cubic_sparsity_schedule
from .targets import apply_masks, keep_masks_applied, load_pruned_state_dict

__all__ = [
    "MFACPruner",
    "MagnitudePruner",
    "Pruner",
    "SparsitySchedule",
    "apply_masks",
    "count_to_prune",
    "cubic_sparsity_schedule",
    "keep_masks_applied",
    "load_pruned_state_dict",
    "obs_saliency",
    "obs_update",
    "prune_lowest",
    "prune_n_m",
    "relative_damping",
]
