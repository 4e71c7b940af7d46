"""Readers for the benchmark validation sets in MMSegmentation's on-disk layouts, with the reference's settings.

Each preset mirrors one ``configs/cfg_<preset>.py`` of the Trident reference (image/label folders, suffixes,
split file, ``reduce_zero_label``) and the MMSegmentation dataset class it names, so image order and label
values are exactly those the published numbers were computed on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from PIL import Image

from ..image import ImageError, check_complete, read_image
from . import dataset_classes
from .metrics import IGNORE_INDEX

SIXTEEN_BIT_VOID = 65535


@dataclass(frozen=True)
class DatasetPreset:
    """Where one validation set lives under ``--data-root`` and how its label maps are read."""

    name: str
    roots: tuple[str, ...]  # dataset folder relative to the data root; first = MMSegmentation's name, then aliases
    img_dir: str
    seg_dir: str
    img_suffix: str
    seg_suffix: str
    split_file: str | None  # list of image names, one per line; None = every image under img_dir (recursive)
    reduce_zero_label: bool
    classes: tuple[str, ...]
    expected_size: int  # images in the full official validation split, to warn about partial copies
    ignore_index: int = IGNORE_INDEX  # 65535 in the 16-bit detectron2 label maps (ADE20K-Full, Pascal Context 459)
    split_optional: bool = False  # without the split file, every image under img_dir (sorted)

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes (label values 0..num_classes-1; `ignore_index` is ignored)."""
        return len(self.classes)


_VOC2012 = ("VOCdevkit/VOC2012",)
_VOC2010 = ("VOCdevkit/VOC2010",)

DATASETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset("voc21", _VOC2012, "JPEGImages", "SegmentationClass", ".jpg", ".png",
                      "ImageSets/Segmentation/val.txt", False, dataset_classes.VOC21, 1449),
        DatasetPreset("voc20", _VOC2012, "JPEGImages", "SegmentationClass", ".jpg", ".png",
                      "ImageSets/Segmentation/val.txt", True, dataset_classes.VOC20, 1449),
        DatasetPreset("context60", _VOC2010, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                      "ImageSets/SegmentationContext/val.txt", False, dataset_classes.CONTEXT60, 5104),
        DatasetPreset("context59", _VOC2010, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                      "ImageSets/SegmentationContext/val.txt", True, dataset_classes.CONTEXT59, 5104),
        # cvt_coco_object.py writes *_instanceTrainIds.png next to COCO-Stuff's labels unless given -o.
        DatasetPreset("coco_object", ("coco_object", "COCOObject", "coco_stuff164k"), "images/val2017",
                      "annotations/val2017", ".jpg", "_instanceTrainIds.png", None, False,
                      dataset_classes.COCO_OBJECT, 5000),
        DatasetPreset("coco_stuff", ("coco_stuff164k", "COCOStuff"), "images/val2017", "annotations/val2017",
                      ".jpg", "_labelTrainIds.png", None, False, dataset_classes.COCO_STUFF, 5000),
        DatasetPreset("city_scapes", ("cityscapes", "CityScapes"), "leftImg8bit/val", "gtFine/val",
                      "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None, False, dataset_classes.CITYSCAPES, 500),
        DatasetPreset("ade20k", ("ade/ADEChallengeData2016", "ADEChallengeData2016"), "images/validation",
                      "annotations/validation", ".jpg", ".png", None, True, dataset_classes.ADE20K, 2000),
        # detectron2's prepare_ade20k_full_sem_seg.py / prepare_pascal_context.py: 16-bit TIFFs, 65535 = void.
        DatasetPreset("ade847", ("ADE20K_2021_17_01", "ade20k_full"), "images_detectron2/validation",
                      "annotations_detectron2/validation", ".jpg", ".tif", "validation.txt", False,
                      dataset_classes.from_class_file("cls_ade20k847.txt"), 2000, SIXTEEN_BIT_VOID,
                      split_optional=True),
        DatasetPreset("context459", _VOC2010, "JPEGImages", "annotations_detectron2/pc459_val", ".jpg", ".tif",
                      "ImageSets/SegmentationContext/val.txt", False,
                      dataset_classes.from_class_file("cls_context459.txt"), 5104, SIXTEEN_BIT_VOID),
    )
}


class Sample(NamedTuple):
    """One validation image: its path, its label map (HxW uint8, 255 = ignore; uint16, 65535 = ignore, for the
    16-bit layouts) and its name in the split."""

    image_path: Path
    label: np.ndarray
    name: str


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSegmentation's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_label(path: str | os.PathLike[str], reduce_zero: bool = False, sixteen_bit: bool = False) -> np.ndarray:
    """Read a label map as mmseg does (PIL, unchanged: palette PNGs give their indices) into HxW uint8, or uint16
    for the 16-bit TIFF layouts (as the reference's MyLoadAnnotations)."""
    try:
        check_complete(path)  # (a PNG's chunks by their CRCs: PIL decodes a damaged one without a word)
        with Image.open(path) as img:
            label = np.array(img)
    except ImageError as e:  # (it names the file and says what is wrong with it)
        raise ValueError(f"{e}; a label map: extract or convert it again") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this label map ({e}): extract or convert it again") from e
    if label.ndim != 2:
        raise ValueError(f"{path}: label map must be single-channel (class indices), got shape {label.shape}")
    if sixteen_bit:
        if label.size and (label.min() < 0 or label.max() > SIXTEEN_BIT_VOID):
            raise ValueError(f"{path}: label values must fit in 0..65535, got {label.min()}..{label.max()}")
        return label.astype(np.uint16)
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{path}: label values must fit in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return reduce_zero_label(label) if reduce_zero else label


def load_image_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as mmcv does (OpenCV, 3-channel colour, EXIF orientation applied) and return it as HxWx3
    uint8 RGB; a file cut short or damaged is refused, naming it (OpenCV fills a cut JPEG in with grey)."""
    return read_image(path)


class SegDataset(Sequence[Sample]):
    """A preset's validation images in mmseg order (split-file order, else sorted paths); labels load lazily."""

    def __init__(self, preset: DatasetPreset, data_root: str | os.PathLike[str]) -> None:
        self.preset = preset
        self.root = _resolve_root(preset, Path(os.path.abspath(Path(data_root).expanduser())))
        img_dir, seg_dir = self.root / preset.img_dir, self.root / preset.seg_dir
        split = self.root / preset.split_file if preset.split_file else None
        if split is not None and preset.split_optional and not split.is_file():
            split = None
        self.names = _read_split(split) if split is not None else _scan(img_dir, preset)
        self.image_paths = [img_dir / (n + preset.img_suffix) for n in self.names]
        self.label_paths = [seg_dir / (n + preset.seg_suffix) for n in self.names]
        _check_files(preset, self.image_paths if split is not None else [], self.label_paths)
        self.official = len(self.names) == preset.expected_size
        if not self.official:
            warnings.warn(
                f"{preset.name}: {len(self.names)} images under {self.root}, the official split has "
                f"{preset.expected_size}; numbers will not be comparable to published ones",
                stacklevel=2,
            )

    @property
    def name(self) -> str:
        """The preset name (e.g. ``voc21``)."""
        return self.preset.name

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in label-index order."""
        return self.preset.classes

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes."""
        return self.preset.num_classes

    @property
    def ignore_index(self) -> int:
        """The label value that is not evaluated (255, or 65535 in the 16-bit layouts)."""
        return self.preset.ignore_index

    def __len__(self) -> int:
        """Number of images."""
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        """Image path, label map (reduce_zero_label applied when the preset says so) and name of image ``index``."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        label = load_label(self.label_paths[index], self.preset.reduce_zero_label,
                           self.preset.ignore_index == SIXTEEN_BIT_VOID)
        return Sample(self.image_paths[index], label, self.names[index])


def build_dataset(preset: str, data_root: str | os.PathLike[str]) -> SegDataset:
    """The validation set of ``preset`` (a key of ``DATASETS``) found under ``data_root``."""
    if preset not in DATASETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(DATASETS)}")
    return SegDataset(DATASETS[preset], data_root)


def _resolve_root(preset: DatasetPreset, data_root: Path) -> Path:
    """The first candidate dataset folder (or ``data_root`` itself) holding both image and label folders."""
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data-root {data_root} is not a directory")
    candidates = [data_root / r for r in preset.roots] + [data_root]
    for root in candidates:
        if (root / preset.img_dir).is_dir() and (root / preset.seg_dir).is_dir():
            return root
    expected = data_root / preset.roots[0]
    others = ", ".join(str(data_root / r) for r in preset.roots[1:])
    raise FileNotFoundError(
        f"{preset.name}: expected the folders {expected / preset.img_dir} and {expected / preset.seg_dir} "
        f"(MMSegmentation layout{'; also looked in ' + others if others else ''}). "
        f"Pass as --data-root the folder that contains {preset.roots[0]!r}."
    )


def _read_split(path: Path) -> list[str]:
    """Image names listed in a split file, one per line (blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} is missing")
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark is no part of the first name)
    except UnicodeDecodeError as e:
        raise ValueError(f"split file {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8, "
                         "one image name per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {path} lists no images")
    return names


def _scan(img_dir: Path, preset: DatasetPreset) -> list[str]:
    """Names (relative path minus suffix) of the non-hidden images under ``img_dir``, sorted like mmseg by path."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(img_dir, followlinks=True):  # (linked city folders, as mmengine)
        real = os.path.realpath(dirpath)
        if real in seen:  # a folder reached again through a link (a loop, or a second link): read once
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()  # (in order: a folder is read under its first name, whatever order the disk lists)
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(preset.img_suffix) and f[0] != "."]
    if not found:
        raise FileNotFoundError(f"{preset.name}: no *{preset.img_suffix} images under {img_dir}")
    rel = [Path(p).relative_to(img_dir).as_posix() for p in sorted(found)]
    return [r[: -len(preset.img_suffix)] for r in rel]


def _check_files(preset: DatasetPreset, images: list[Path], labels: list[Path]) -> None:
    """Fail early, naming a few, when listed images or label maps are missing (not hours into a run)."""
    missing = [p for p in images + labels if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        hint = " (run the reference's datasets/cvt_coco_object.py)" if preset.name == "coco_object" else ""
        raise FileNotFoundError(f"{preset.name}: {len(missing)} files missing, e.g. {shown}{hint}")
