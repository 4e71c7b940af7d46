"""Each stage's parameters as a small frozen config, checked when it is built; `Params` bundles them (a preset).

The modes are `Literal` types; their tuples (PARADIGMS, CORRELATIONS, MASK_PROMPT_MODES) are the one list that the
checks, the command line's choices and the nodes' dropdowns all use."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

import numpy as np

from .pamr import DEFAULT_DILATIONS, check_pamr
from .sam_tiles import parse_tiles

Paradigm = Literal["splice_then_segment", "segment_then_splice"]
Correlation = Literal["affinity", "attention", "cosine", "none"]
MaskPromptMode = Literal["reference", "batched"]
PARADIGMS: tuple[str, ...] = get_args(Paradigm)
CORRELATIONS: tuple[str, ...] = get_args(Correlation)
MASK_PROMPT_MODES: tuple[str, ...] = get_args(MaskPromptMode)
SAM_TILE_CHOICES = ("1x1", "1x2", "2x1", "2x2", "auto")  # the usual tilings; any "RxC" is accepted

Range = tuple[float, float, bool]  # lowest, highest, whole numbers only


def _check_range(config: object, name: str, lo: float, hi: float, whole: bool, why: str = "") -> None:
    """Refuse a value that would give a meaningless result (a one-pixel image, gaps between windows, NaN); keep
    one that passes as a Python int or float (NumPy's scalars and 64.0 for a whole number are taken as such)."""
    value = getattr(config, name)
    kind = "a whole number" if whole else "a number"
    default = config.__dataclass_fields__[name].default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is not a number: expected {kind} from {lo:g} to {hi:g} (default "
                         f"{default}).")
    ok = math.isfinite(value) and lo <= value <= hi and (not whole or value == int(value))
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: expected {kind} from {lo:g} to {hi:g}{why}. "
                         f"Give a value in that range (default {default}).")
    object.__setattr__(config, name, int(value) if whole else float(value))  # (a frozen config: set once, here)


def _check_ranges(config: object, ranges: dict[str, Range]) -> None:
    for name, (lo, hi, whole) in ranges.items():
        _check_range(config, name, lo, hi, whole)


def check_mode(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Refuse a mode that is not one of `allowed`, naming them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


MIN_SHORT_SIDE = 32  # the smallest short side an image is scaled to (WindowConfig's range)
MAX_WINDOW = 1024  # the largest window side (the nodes' range too)
MIN_STRIDE = 16  # the smallest step between windows (the nodes' range too)


def check_flag(name: str, value: object) -> bool:
    """Refuse a switch that is not True or False (the text "False" turned the refinement on); NumPy's bool is
    taken."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return bool(value)


@dataclass(frozen=True)
class WindowConfig:
    """S0, S2-S4: the image's scale, the sliding windows, and DINO's proxy attention (gamma, beta)."""

    short_side: int = 448
    long_cap: int = 2048
    window: int = 336
    stride: int = 224
    gamma: float = 3.0
    beta: float = 1.2

    def __post_init__(self) -> None:
        _check_ranges(self, {"short_side": (MIN_SHORT_SIDE, 8192, True), "long_cap": (32, 16384, True)})
        _check_range(self, "window", 32, MAX_WINDOW, True, " (a window's attention grows with its side to the fourth "
                     "power: 4096 asked for 17 GB and more)")
        _check_range(self, "stride", MIN_STRIDE, self.window, True,
                     f" (the window, {self.window}): a larger stride leaves gaps between windows, a smaller window "
                     f"needs a stride of at most its side, and one under {MIN_STRIDE} (a CLIP patch) only repeats "
                     "nearly the same windows, thousands of them")
        _check_ranges(self, {"gamma": (-1e6, 1e6, False), "beta": (-1e6, 1e6, False)})


# cos_fac from which SAM stays float32 in the CPU's bf16 mode (AggregateConfig.flips_in_bf16): between the presets'
# 1.2 (probabilities within 0.0012 of float32's with a bfloat16 SAM) and city_scapes' 3.0 (0.019).
BF16_FLIP_COS_FAC = 2.0


@dataclass(frozen=True)
class AggregateConfig:
    """S5-S7: how the spliced features are spread over the image (SAM's correlation, per SAM tile)."""

    paradigm: Paradigm = "splice_then_segment"
    correlation: Correlation = "affinity"
    sam_tiles: str = "1x1"
    cos_fac: float = 1.2
    refine_neg_cos: bool = True

    def __post_init__(self) -> None:
        check_mode("paradigm", self.paradigm, PARADIGMS)
        check_mode("correlation", self.correlation, CORRELATIONS)
        if not isinstance(self.sam_tiles, str):
            raise ValueError(f"sam_tiles must be text such as {', '.join(SAM_TILE_CHOICES)} or RxC, not "
                             f"{self.sam_tiles!r}")
        object.__setattr__(self, "refine_neg_cos", check_flag("refine_neg_cos", self.refine_neg_cos))
        parse_tiles(self.sam_tiles, (1024, 1024))  # its form; whether the image is large enough for it, when used
        _check_range(self, "cos_fac", -1e6, 1e6, False)

    @property
    def uses_sam(self) -> bool:
        """Whether this aggregation needs SAM (the segment-then-splice baseline does not)."""
        return self.paradigm == "splice_then_segment"

    @property
    def flips_in_bf16(self) -> bool:
        """Whether the affinity's thresholds sit so high (cos_fac from BF16_FLIP_COS_FAC: city_scapes' 3.0 puts most
        at their clamp, 0.9) that a bfloat16 SAM encoder flips enough of them to move class probabilities by more
        than 0.01: measured 0.019 there, 0.0012 at cos_fac 1.2 (docs/performance-bf16.md)."""
        return self.uses_sam and self.correlation in ("affinity", "cosine") and self.cos_fac >= BF16_FLIP_COS_FAC


@dataclass(frozen=True)
class ClassifyConfig:
    """S8: softmax temperature, confidence threshold, and PAMR on the logits (0 steps: off)."""

    logit_scale: float = 40.0
    prob_thd: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = DEFAULT_DILATIONS

    def __post_init__(self) -> None:
        _check_ranges(self, {"logit_scale": (1e-6, 1e6, False), "prob_thd": (0, 1, False)})
        check_pamr(self.pamr_steps, self.pamr_dilations)
        object.__setattr__(self, "pamr_steps", int(self.pamr_steps))
        object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in self.pamr_dilations))  # (hashable)


@dataclass(frozen=True)
class RefineConfig:
    """S9: the reference's SAM refinement constants."""

    coarse_thresh: float = 0.2
    minimal_area: int = 225
    mask_alpha: float = 0.005
    iou_thresh: float = 0.80
    mask_prompt_mode: MaskPromptMode = "reference"

    def __post_init__(self) -> None:
        _check_ranges(self, {"coarse_thresh": (0, 1, False), "minimal_area": (0, 1 << 30, True),
                             "mask_alpha": (0, 1e6, False), "iou_thresh": (0, 1, False)})
        check_mode("mask_prompt_mode", self.mask_prompt_mode, MASK_PROMPT_MODES)


STAGES = {"windows": WindowConfig, "aggregation": AggregateConfig, "classification": ClassifyConfig,
          "refinement": RefineConfig}
_STAGE_OF = {f.name: stage for stage, cls in STAGES.items() for f in fields(cls)}


@dataclass(frozen=True)
class Params:
    """Every constant of the method, one config per stage, and whether SAM refinement runs."""

    windows: WindowConfig = field(default_factory=WindowConfig)
    aggregation: AggregateConfig = field(default_factory=AggregateConfig)
    classification: ClassifyConfig = field(default_factory=ClassifyConfig)
    refinement: RefineConfig = field(default_factory=RefineConfig)
    refine: bool = False

    def __post_init__(self) -> None:
        for stage, cls in STAGES.items():
            if not isinstance(getattr(self, stage), cls):
                raise TypeError(f"Params({stage}=...) takes a {cls.__name__}, not {type(getattr(self, stage)).__name__}"
                                f": build it as Params().update(name=value, ...) or {cls.__name__}(name=value, ...)")
        object.__setattr__(self, "refine", check_flag("refine", self.refine))

    def update(self, **flat: object) -> Params:
        """A copy with parameters changed by their own names (short_side=336, paradigm=..., refine=True), each
        routed to its stage's config, which checks it; None values are ignored."""
        per_stage: dict[str, dict[str, object]] = {}
        top = {}
        for name, value in flat.items():
            if value is None:
                continue
            if name == "refine":
                top[name] = value
            elif name in _STAGE_OF:
                per_stage.setdefault(_STAGE_OF[name], {})[name] = value
            else:
                raise TypeError(f"unknown parameter {name!r}; known: {', '.join([*_STAGE_OF, 'refine'])}")
        stages = {stage: replace(getattr(self, stage), **changes) for stage, changes in per_stage.items()}
        return replace(self, **stages, **top)

    def flat(self) -> dict[str, object]:
        """Every parameter under its own name (what the outputs' and the eval's settings keys hash)."""
        out: dict[str, object] = {}
        for stage in STAGES:
            out.update(dataclasses.asdict(getattr(self, stage)))
        return {**out, "refine": self.refine}
