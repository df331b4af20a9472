"""lbyl: data-free restoration of channel-pruned PyTorch networks."""
from .api import restore, shrink
from .criteria import CRITERIA, keep_count, select_channels
from .delivery import METHODS, delivery_matrix, restoration_loss
from .graph import find_groups
from .io import load_restored, save_restored
from .report import Report

__version__ = "0.1.0"
__all__ = [
    "restore", "shrink", "find_groups", "delivery_matrix", "restoration_loss", "select_channels",
    "keep_count", "Report", "save_restored", "load_restored", "METHODS", "CRITERIA", "__version__",
]
