"""lbyl: data-free restoration of channel-pruned PyTorch networks.

``plan`` (which channels) -> ``restore`` (a method solves each layer, surgery applies it).
"""
from . import paper
from .api import plan, restore, shrink
from .criteria import CRITERIA, keep_count, select_channels
from .delivery import BatchNormStats, ProducerStats, restoration_loss
from .graph import find_groups
from .io import load_restored, save_restored
from .methods import LBYL, METHODS, Method, NeuronMerging, Prune, Solution, as_method
from .planning import Plan, PlannedLayer
from .report import Report

__version__ = "0.8.0"
__all__ = [
    "plan", "restore", "shrink", "Plan", "PlannedLayer", "Report",
    "Method", "LBYL", "NeuronMerging", "Prune", "paper", "Solution", "as_method", "METHODS",
    "ProducerStats", "BatchNormStats", "restoration_loss", "find_groups", "select_channels", "keep_count",
    "CRITERIA", "save_restored", "load_restored", "__version__",
]  # fmt: skip
