"""Benchmark evaluation: dataset readers in MMSegmentation layouts, mmseg-exact IoU metrics, resumable runner."""

from .arguments import add_eval_arguments
from .datasets import (
    DATASETS,
    DatasetPreset,
    Sample,
    SegDataset,
    build_dataset,
    load_image_rgb,
    load_label,
    reduce_zero_label,
)
from .distributed import init_distributed
from .metrics import IGNORE_INDEX, SegMetrics, compute_metrics, confusion_matrix, format_table, percent
from .runner import evaluate

__all__ = [
    "IGNORE_INDEX",
    "DATASETS",
    "DatasetPreset",
    "Sample",
    "SegDataset",
    "SegMetrics",
    "add_eval_arguments",
    "build_dataset",
    "compute_metrics",
    "confusion_matrix",
    "evaluate",
    "format_table",
    "init_distributed",
    "load_image_rgb",
    "load_label",
    "percent",
    "reduce_zero_label",
]
