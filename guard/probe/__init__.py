"""Linear probe training: data, activation collection, fitting, metrics and the ``guard probe`` CLI."""

from guard.probe.data import DataError, Example, read_jsonl
from guard.probe.metrics import auroc, threshold_at_fpr, tpr_at_fpr
from guard.probe.train import TrainConfig, TrainResult, train_probe

__all__ = [
    "DataError",
    "Example",
    "TrainConfig",
    "TrainResult",
    "auroc",
    "read_jsonl",
    "threshold_at_fpr",
    "tpr_at_fpr",
    "train_probe",
]
