"""Command-line options of ``python -m trident_core eval``, shared so every entry point spells them the same."""

from __future__ import annotations

import argparse

from .datasets import DATASETS


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --preset, --data-root, --limit, --refine/--no-refine, --out and --no-resume to ``parser``."""
    parser.add_argument("--preset", required=True, choices=list(DATASETS), type=str.lower,
                        help="validation set to evaluate on")
    parser.add_argument(
        "--data-root",
        required=True,
        help="folder holding the datasets in MMSegmentation's layout (VOCdevkit/, coco_stuff164k/, cityscapes/, "
        "ade/ADEChallengeData2016/, coco_object/)",
    )
    parser.add_argument("--limit", type=_at_least_one, default=None, metavar="N",
                        help="evaluate only the first N images (smoke tests)")
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SAM refinement on/off (default: the pipeline's default)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="result JSON path; per-rank resume state files are kept beside it (without --out nothing is written "
        "and an interrupted run cannot resume)",
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="ignore and delete the resume state of a previous run with the same --out",
    )
    return parser


def _at_least_one(text: str) -> int:
    """A count of images: a whole number, at least 1 (no images would give no metrics)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: evaluate at least 1 image") from None
    return value
