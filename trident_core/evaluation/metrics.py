"""Confusion-matrix segmentation metrics that reproduce MMSegmentation 1.x ``IoUMetric`` (mIoU, mAcc, aAcc).

MMSegmentation accumulates per-class ``area_intersect / area_union / area_pred_label / area_label`` over the
images; all four are margins of the (label x prediction) confusion matrix, so a single int64 matrix is kept
instead: it is exact at any dataset size and distributed ranks can sum it with one ``all_reduce``.
Ratios are taken in float64 (mmseg sums float32 histograms, which can move a last decimal on huge sets).

The matrix has one extra last column, "no class": pixels whose prediction is outside ``[0, num_classes)``
(e.g. the pipeline's UNLABELED = -1). mmseg's ``torch.histc`` drops such predictions from ``area_pred_label``
but keeps the pixel in ``area_label``, so they lower Acc and IoU of the true class; the column does the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(C, C + 1) int64 counts: rows = true class, columns = predicted class then "no class"; ignored pixels dropped.

    Label values outside ``[0, C)`` other than ``ignore_index`` mean a wrong preset or a corrupt label map (mmseg
    would silently drop them), so they raise.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    if not np.issubdtype(pred.dtype, np.integer):
        raise TypeError(f"prediction must hold integer class indices, got dtype {pred.dtype}")
    keep = label != ignore_index
    gt = label[keep].astype(np.int64)
    pr = pred[keep].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])
        raise ValueError(f"label values {bad.tolist()} are outside [0, {num_classes}) and not {ignore_index}")
    pr[(pr < 0) | (pr >= num_classes)] = num_classes
    counts = np.bincount(gt * (num_classes + 1) + pr, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1).astype(np.int64, copy=False)


@dataclass(frozen=True)
class SegMetrics:
    """Per-class areas and IoU/Acc (fractions, NaN where undefined) plus the mmseg summary numbers."""

    area_intersect: np.ndarray
    area_union: np.ndarray
    area_pred_label: np.ndarray
    area_label: np.ndarray
    iou: np.ndarray
    acc: np.ndarray
    aacc: float
    miou: float
    macc: float


def compute_metrics(confusion: np.ndarray) -> SegMetrics:
    """IoU = I/U, Acc = I/|label|, aAcc = sum I / sum |label|; means are NaN-means (classes with 0/0 left out).

    ``confusion`` is (C, C + 1) as :func:`confusion_matrix` returns, or a plain square (C, C) matrix.
    """
    conf = np.asarray(confusion, dtype=np.int64)
    num_classes = conf.shape[0] if conf.ndim == 2 else -1
    if conf.shape not in ((num_classes, num_classes), (num_classes, num_classes + 1)):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C + 1), got shape {conf.shape}")
    intersect = np.diag(conf[:, :num_classes])
    area_label = conf.sum(axis=1)
    area_pred = conf[:, :num_classes].sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union.astype(np.float64)
        acc = intersect / area_label.astype(np.float64)
        aacc = float(intersect.sum() / np.float64(area_label.sum()))
    return SegMetrics(
        area_intersect=intersect,
        area_union=union,
        area_pred_label=area_pred,
        area_label=area_label,
        iou=iou,
        acc=acc,
        aacc=aacc,
        miou=_nanmean(iou),
        macc=_nanmean(acc),
    )


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` that returns NaN without a warning when every entry is NaN."""
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def percent(value: float) -> float | None:
    """A fraction as a percentage rounded like mmseg (``np.round(x * 100, 2)``); None for NaN so JSON stays valid."""
    return None if np.isnan(value) else float(np.round(value * 100, 2))


def format_table(metrics: SegMetrics, class_names: Sequence[str]) -> str:
    """The per-class IoU/Acc table plus the aAcc/mIoU/mAcc line, in percent with 2 decimals as mmseg logs it."""
    if len(class_names) != len(metrics.iou):
        raise ValueError(f"{len(class_names)} class names for {len(metrics.iou)} classes")
    width = max([5, *(len(name) for name in class_names)])

    def cell(value: float) -> str:
        """One percentage, or ``nan`` for an undefined class."""
        pct = percent(value)
        return "nan" if pct is None else f"{pct:.2f}"

    rule = "+" + "-" * (width + 2) + "+---------+---------+"
    lines = [rule, f"| {'Class':<{width}} | {'IoU':>7} | {'Acc':>7} |", rule]
    for name, iou, acc in zip(class_names, metrics.iou, metrics.acc):
        lines.append(f"| {name:<{width}} | {cell(iou):>7} | {cell(acc):>7} |")
    lines += [rule, f"aAcc: {cell(metrics.aacc)}  mIoU: {cell(metrics.miou)}  mAcc: {cell(metrics.macc)}"]
    return "\n".join(lines)
