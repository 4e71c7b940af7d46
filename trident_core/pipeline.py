"""The whole method in one call, and each stage as a function of typed inputs (what the ComfyUI nodes expose)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL.Image import Image as PILImage
from torch import nn

from .aggregation import FeatureMap, splice_and_aggregate
from .classes import ClassList, check_several, parse_classes
from .classify import Segmentation, classify
from .config import AggregateConfig, Params, WindowConfig
from .devices import frames_per_forward, resolve_device, resolve_dtype
from .image import clip_input, image_digest, to_rgb_uint8
from .models import ClipModel, DinoModel, SamEncoding, SamModel, load_clip, load_dino, load_sam
from .pamr import Pamr, pamr_guide
from .refine import refine
from .residency import releaser, trim_heap
from .sam_tiles import SamTileEncodings, SamTiling, encode_frame_tiles
from .text import encode_classes
from .window_features import WindowFeatures, frame_window_features, window_chunk
from .windows import plan_windows

Progress = Callable[[str], None]
logger = logging.getLogger(__name__)
DEFAULT_PARAMS = Params()


def _noop(_stage: str) -> None:
    return None


def compute_window_features(clip: ClipModel, dino: DinoModel, image: object, config: WindowConfig,
                            progress: Progress = _noop, after_dino: Callable[[], None] | None = None,
                            after_block: Callable[[nn.Module], object] | None = None) -> WindowFeatures:
    """S0, S2, S3, S4: the image rescaled, windowed, and CLIP's DINO-guided window features (`after_dino()` runs
    once DINO is done with every window, before CLIP starts; `after_block(block)` after each block of either tower
    in every forward, as `frame_window_features` has it)."""
    return compute_frame_window_features(clip, dino, [image], config, progress, after_dino,
                                         after_block=after_block)[0]


def compute_frame_window_features(clip: ClipModel, dino: DinoModel, images: Sequence[object], config: WindowConfig,
                                  progress: Progress = _noop, after_dino: Callable[[], None] | None = None,
                                  digests: Sequence[str] | None = None,
                                  after_block: Callable[[nn.Module], object] | None = None) -> list[WindowFeatures]:
    """`compute_window_features` of several frames of one size, each forward carrying `window_chunk` windows per
    frame (`frame_window_features`; `digests`: the frames' `image_digest`s where the caller has them)."""
    if config.window % clip.patch_size or config.window % dino.patch_size:
        raise ValueError(f"window {config.window} must be a multiple of CLIP's patch ({clip.patch_size}) and "
                         f"DINO's ({dino.patch_size})")
    imgs = same_size([to_rgb_uint8(image) for image in images])
    xs = [clip_input(img, config.short_side, clip.patch_size, config.window, config.long_cap, dino.device)
          for img in imgs]  # (made where DINO takes them: on a GPU, each frame's pixels copied once)
    plan = plan_windows(tuple(xs[0].shape[-2:]), config.window, config.stride)
    wfs = frame_window_features(clip, dino, xs, plan, config, image_size=imgs[0].shape[:2],
                                chunk=window_chunk(clip.device) * len(xs), on_chunk=lambda: progress("windows"),
                                after_dino=after_dino, after_block=after_block)
    scale = (config.short_side, config.long_cap)
    digests = digests or [image_digest(img) for img in imgs]
    return [dataclasses.replace(wf, image_digest=d, scale=scale) for wf, d in zip(wfs, digests)]


def same_size(imgs: list[np.ndarray]) -> list[np.ndarray]:
    """The frames, refused in one line unless they have one size (their windows and tiles are planned once)."""
    sizes = sorted({img.shape[:2] for img in imgs})
    if len(sizes) > 1:
        raise ValueError(f"frames sharing forwards must have one size, not {' and '.join(f'{w}x{h}' for h, w in sizes)}"
                         ": give frames of one size (Trident.segment_frames groups them so)")
    return imgs


def encode_image(sam: SamModel | None, image: object, config: AggregateConfig, progress: Progress = _noop,
                 after_block: Callable[[nn.Module], object] | None = None) -> SamTileEncodings | None:
    """S6's SAM encoding of the image's tiles, or None where the aggregation needs none (segment_then_splice);
    `after_block` as `encode_frame_tiles` has it."""
    return encode_frames(sam, [image], config, progress, after_block=after_block)[0]


def encode_frames(sam: SamModel | None, images: Sequence[object], config: AggregateConfig,
                  progress: Progress = _noop, digests: Sequence[str] | None = None,
                  after_block: Callable[[nn.Module], object] | None = None) -> list[SamTileEncodings | None]:
    """`encode_image` of several frames of one size, each tile of every frame in one forward of SAM's encoder
    (`digests`: the frames' `image_digest`s where the caller has them; `after_block` as `encode_frame_tiles`
    has it)."""
    if not config.uses_sam:
        return [None] * len(images)
    require_sam(sam, Params(aggregation=config))
    imgs = same_size([to_rgb_uint8(image) for image in images])
    encodings = encode_frame_tiles(sam, imgs, SamTiling.of(config.sam_tiles, imgs[0].shape[:2]), digests,
                                   after_block)
    progress("sam")
    return encodings


def _refinement_input(encodings: SamTileEncodings | None, params: Params) -> SamEncoding | None:
    """What the refinement reads of an image's SAM encodings: the whole image's (one tile) without the q, k, v the
    aggregation read; None without refinement, or for tiles (the refinement encodes the image itself)."""
    whole = encodings.whole if encodings is not None and params.refine else None
    return whole.for_refinement() if whole is not None else None


def sam_dtype(dtype: torch.dtype, device: torch.device, aggregation: AggregateConfig | None) -> torch.dtype:
    """SAM's dtype for models loaded in `dtype`: float32 instead of the CPU's bfloat16 where the aggregation's
    thresholds would flip under it (AggregateConfig.flips_in_bf16), bfloat16 costing accuracy more than it saves."""
    if dtype == torch.bfloat16 and device.type == "cpu" and aggregation is not None and aggregation.flips_in_bf16:
        return torch.float32
    return dtype


def bf16_flip_cost(aggregation: AggregateConfig) -> str:
    """Why SAM belongs in float32 under this aggregation (AggregateConfig.flips_in_bf16), for the user's line."""
    return (f"with cos_fac {aggregation.cos_fac:g} the affinity's thresholds sit near 0.9, where a bf16 SAM moves "
            "class probabilities by up to 0.02 from fp32's")


def bf16_sam_warning(sam: SamModel | None, aggregation: AggregateConfig) -> str | None:
    """One line for a user whose bfloat16 SAM on the CPU runs an aggregation that flips under it, else None."""
    if sam is None or sam_dtype(sam.dtype, sam.device, aggregation) == sam.dtype:
        return None
    return f"SAM is bf16: {bf16_flip_cost(aggregation)}; load SAM in fp32 for fp32's results"


def compute_feature_map(wf: WindowFeatures, clip: ClipModel, sam: SamModel | None,
                        encodings: SamTileEncodings | None, config: AggregateConfig,
                        progress: Progress = _noop, check: bool = True) -> FeatureMap:
    """S5 to S7: splice, SAM affinity over the image's tile encodings, aggregation, projection (or the
    segment-then-splice baseline, which takes no encodings); `check`: as `splice_and_aggregate`'s."""
    warning = bf16_sam_warning(sam, config)
    if warning:
        _warn_once(warning)
    return splice_and_aggregate(wf, clip, sam, encodings, config, on_step=lambda: progress("sam"),
                                check=check)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _class_list(classes: str | list[str] | tuple[str, ...] | ClassList) -> ClassList:
    """A ClassList as given (two classes or more, as a parsed one), or parsed from typed text (a string) or one
    class per entry (a list)."""
    return check_several(classes) if isinstance(classes, ClassList) else parse_classes(classes)


def check_call(params: object, progress: object) -> None:
    """One clear line for parameters of the wrong kind given to the library (a dict, None, a string)."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be a trident_core.Params (Params(), Params().update(refine=True) or "
                        f"get_preset(name).params), not {type(params).__name__}")
    check_progress(progress)


def check_progress(progress: object) -> None:
    """One clear line for a progress callback that cannot be called."""
    if not callable(progress):
        raise TypeError(f"progress must be a function taking one string (or left out), not {type(progress).__name__}")


def check_per_forward(per_forward: object) -> None:
    """`segment_frames`' per_forward: a whole number of frames, at least 1, or a function of the image size."""
    if not (callable(per_forward) or isinstance(per_forward, numbers.Integral) and not isinstance(per_forward, bool)
            and per_forward >= 1):
        raise ValueError(f"per_forward must be a whole number of frames, 1 or more (or a function of the image "
                         f"size giving one), not {per_forward!r}")


def needs_sam(params: Params) -> bool:
    """Whether these parameters use SAM: the splice-then-segment aggregation or the refinement (the
    segment-then-splice baseline without refinement runs on CLIP and DINO alone)."""
    return params.aggregation.uses_sam or params.refine


SAM_FIX = ("give one, or choose the segment_then_splice paradigm without refinement, which runs without SAM")


def require_sam(sam: object | None, params: Params, fix: str = SAM_FIX) -> None:
    """One clear line when the parameters need SAM and none was given; `fix` says what to do."""
    if sam is None and needs_sam(params):
        what = "SAM refinement" if params.refine else f"the {params.aggregation.paradigm} paradigm"
        raise ValueError(f"{what} needs a SAM model (e.g. sam_vit_b_01ec64.pth); {fix}")


def guide_params(params: Params, fm: FeatureMap, short_side: int = 0) -> Params:
    """`params` with PAMR's guide at the scale the feature map's windows were made at (where it knows it), unless
    `short_side` names another."""
    if short_side or not fm.scale[0]:
        return params
    return params.update(short_side=fm.scale[0], long_cap=fm.scale[1])


def pamr_for(image: object, params: Params) -> Pamr | None:
    """PAMR for this image with the parameters' steps and dilations (its guide at the windows' scale), or None when
    it is off."""
    steps, dilations = params.classification.pamr_steps, params.classification.pamr_dilations
    if not steps:
        return None
    img = to_rgb_uint8(image)
    return Pamr(steps, tuple(dilations), pamr_guide(img, params.windows.short_side, params.windows.long_cap))


@dataclass(eq=False)
class Trident:
    """CLIP + DINO + SAM, ready to segment images with any class list (SAM may be None for the
    segment-then-splice baseline without refinement)."""

    clip: ClipModel
    dino: DinoModel
    sam: SamModel | None = None
    # Unmap each model's memory-mapped weight pages as soon as its stage is done (DINO's before CLIP runs) and give
    # the freed heap back after DINO, after SAM's encoder, after the aggregation, before the refinement and after
    # each image (residency.py): the peak then holds one model's weights and one stage's working memory, and memory
    # does not creep from image to image, at the price of mapping the weights again per image (minor faults, same
    # values).
    release_weights: bool = False

    @classmethod
    def from_files(cls, clip: str | os.PathLike, dino: str | os.PathLike, sam: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, precision: str = "auto",
                   cache: Path | None = None, aggregation: AggregateConfig | None = None) -> Trident:
        """Load the models from their checkpoint files (SAM only when a file is given); `cache`: a folder where
        bfloat16 copies are kept, so later loads map them instead of converting again (`models/conversion.py`);
        `aggregation`: the one these models will run, which can keep SAM float32 (`sam_dtype`)."""
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        for name, value in (("clip", clip), ("dino", dino), ("sam", sam), ("cache", cache)):
            if not isinstance(value, (str, os.PathLike)) and (value is not None or name in ("clip", "dino")):
                raise TypeError(f"{name} must be a file path (a string or a Path), not {type(value).__name__}")
        cache = None if cache is None else Path(cache)
        return cls(load_clip(clip, dev, dtype, cache=cache), load_dino(dino, dev, dtype, cache),
                   load_sam(sam, dev, sam_dtype(dtype, dev, aggregation), cache) if sam is not None else None)

    def text(self, classes: str | list[str] | ClassList, progress: Progress = _noop,
             after_block: Callable[[nn.Module], object] | None = None) -> torch.Tensor:
        """Query embeddings (cached per name on the CLIP model); `progress` gets "text NN%" in steps of 10 %;
        `after_block` each text block once it has run, where names are encoded (`text.encode_names`)."""
        check_progress(progress)
        return encode_classes(self.clip, _class_list(classes),
                              lambda done, total: progress(f"text {done * 10 // total * 10}%"), after_block)

    @torch.no_grad()
    def segment(self, image: object, classes: str | list[str] | ClassList, params: Params = DEFAULT_PARAMS,
                progress: Progress = _noop,
                after_classify: Callable[[Segmentation], Segmentation] | None = None) -> Segmentation:
        """Label map, probabilities and raw logits of one image (path, PIL, array or tensor, HxWxC);
        `after_classify` (e.g. a video's temporal smoothing) takes the classification before SAM refines it."""
        check_call(params, progress)
        require_sam(self.sam, params)
        cl = _class_list(classes)
        img = to_rgb_uint8(image)
        pamr = pamr_for(img, params)
        free = releaser() if self.release_weights else None  # (the file mappings read once for the image)
        text = self.text(cl, progress, free)
        progress("text")
        if free:  # (the text tower's pages, read once for names not yet cached)
            free(p for name, p in self.clip.model.named_parameters() if not name.startswith("visual."))

        def after_dino() -> None:  # DINO's weights and the heap its activations freed, given back before CLIP runs
            free(self.dino.model)
            trim_heap()
        wf = compute_window_features(self.clip, self.dino, img, params.windows, progress, after_dino if free else None,
                                     free)  # (one block at a time)
        if free:
            free(self.clip.model.visual)
            trim_heap()  # (CLIP's freed activations, before SAM's encoder)
        encodings = encode_image(self.sam, img, params.aggregation, progress, free)
        if free and encodings is not None:
            free(self.sam.model.image_encoder)  # what follows uses its encodings, not its weights
            trim_heap()  # the encoder's freed activations, before classification's full-resolution maps
        fm = compute_feature_map(wf, self.clip, self.sam, encodings, params.aggregation, progress)
        whole = _refinement_input(encodings, params)
        del wf, encodings  # (freed before the full-resolution maps: the refinement reads the last block's input only)
        if self.release_weights:
            trim_heap()  # the aggregation's freed blocks, before classification's full-resolution maps
        seg = classify(fm, text, cl, params.classification, pamr)
        if after_classify is not None:
            seg = after_classify(seg)
        progress("classify")
        if params.refine:
            if self.release_weights:
                trim_heap()  # the aggregation's freed blocks, before the refinement's full-resolution maps
            seg = refine(seg, self.sam, img, params.refinement, whole, on_class=lambda: progress("refine"))
        if free:
            if self.sam is not None:
                free(self.sam.model)
            trim_heap()  # (after the big stages only: trimming after each costs more page faults than it saves)
        return seg

    def frames_per_forward(self, params: Params, image_size: tuple[int, int], free_bytes: int | None = None) -> int:
        """`devices.frames_per_forward` for frames of `image_size` under `params` (their SAM tiles count)."""
        tiles = SamTiling.of(params.aggregation.sam_tiles, image_size) if params.aggregation.uses_sam else None
        return frames_per_forward(self.clip.device, free_bytes, tiles.rows * tiles.cols if tiles else 1)

    def segment_frames(self, images: Iterable[object], classes: str | list[str] | ClassList,
                       params: Params = DEFAULT_PARAMS,
                       progress: Progress = _noop,
                       after_classify: Callable[[Segmentation], Segmentation] | None = None,
                       per_forward: int | Callable[[tuple[int, int]], int] = 1) -> Iterator[Segmentation]:
        """`segment` of each image in order, yielded as each is done. With `per_forward` > 1 (a GPU's choice,
        `frames_per_forward`; or that choice for a group's image size (H, W)) up to that many consecutive frames
        of one size share their forwards: their windows through DINO and CLIP and their tiles through SAM's
        encoder (equal to one frame at a time within the dtype's rounding), then each frame's aggregation (the
        group's all queued before the first classification), and per frame the classification and refinement.
        Where the choice is 1, frames go one at a time through `segment` (weights
        released between stages where `release_weights` says so). Images are read as they are needed: at most
        one group ahead of the result yielded."""
        if isinstance(images, (str, bytes, os.PathLike, PILImage)) or getattr(images, "ndim", 4) != 4:
            raise ValueError("segment_frames takes several images (a list, an iterable or a batch [N, H, W, C]); "
                             "for one image use segment")
        check_call(params, progress)
        check_per_forward(per_forward)
        if not callable(per_forward) and per_forward <= 1:
            for image in images:
                yield self.segment(image, classes, params, progress, after_classify)
                del image  # (not held while the next one is read)
            return
        limit = per_forward if callable(per_forward) else lambda _size: per_forward
        cl = _class_list(classes)
        group: list[np.ndarray] = []
        count = 1  # the current group's share of one forward
        for image in images:
            img = to_rgb_uint8(image)
            del image
            if group and img.shape != group[0].shape:
                yield from self._segment_group(group, cl, params, progress, after_classify)
                group = []
            if not group:
                count = limit(img.shape[:2])
            if count <= 1:
                yield self.segment(img, cl, params, progress, after_classify)
            else:
                group.append(img)
            del img  # (the group holds what it needs; nothing else held while the next image is read)
            if group and len(group) >= count:
                yield from self._segment_group(group, cl, params, progress, after_classify)
                group = []
        if group:
            yield from self._segment_group(group, cl, params, progress, after_classify)

    def _segment_group(self, imgs: list[np.ndarray], cl: ClassList, params: Params, progress: Progress,
                       after_classify: Callable[[Segmentation], Segmentation] | None) -> Iterator[Segmentation]:
        """Frames of one size: their windows and SAM encodings in shared forwards, then each frame's segment."""
        require_sam(self.sam, params)
        text = self.text(cl, progress).to(self.clip.device)  # (once per group, not a blocking copy per frame)
        progress("text")
        digests = [image_digest(img) for img in imgs]  # (once a frame: each stage hashed it again)
        wfs = compute_frame_window_features(self.clip, self.dino, imgs, params.windows, progress, digests=digests)
        encodings = encode_frames(self.sam, imgs, params.aggregation, progress, digests)
        # every frame's feature map queued before any is classified, unchecked (each classification checks its
        # logits, which a NaN or Inf in the features reaches): on a GPU the host launches the next while the GPU
        # computes, where each frame's check waited for the queue
        fms = [compute_feature_map(wf, self.clip, self.sam, enc, params.aggregation, progress, check=False)
               for wf, enc in zip(wfs, encodings)]
        del wfs  # (the window features are done with; of the encodings, what the refinement reads)
        shares = [(fm, _refinement_input(enc, params)) for fm, enc in zip(fms, encodings)]
        del fms, encodings
        for img in imgs:
            # the frame's share popped, its result yielded, not kept: nothing of a frame stays here once handed on
            yield self._finish(img, *shares.pop(0), text, cl, params, progress, after_classify)

    @torch.no_grad()  # (here, not on the generators: torch's wrapper of a generator holds the result it yielded)
    def _finish(self, img: np.ndarray, fm: FeatureMap, whole: SamEncoding | None, text: torch.Tensor,
                cl: ClassList, params: Params, progress: Progress,
                after_classify: Callable[[Segmentation], Segmentation] | None) -> Segmentation:
        """A frame of `segment_frames` from its feature map (and SAM encodings, for the refinement):
        classification, refinement."""
        seg = classify(fm, text, cl, params.classification, pamr_for(img, params))
        if after_classify is not None:
            seg = after_classify(seg)
        progress("classify")
        if params.refine:
            seg = refine(seg, self.sam, img, params.refinement, whole, on_class=lambda: progress("refine"))
        return seg
