"""One node per stage of the method (text, window features, splice & aggregate, classify, refine) and the
all-in-one Trident Segment node. Each runs a batch image by image; outputs go to ComfyUI's intermediate device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..trident_core.aggregation import FeatureMap
from ..trident_core.classes import parse_classes
from ..trident_core.classify import classify
from ..trident_core.compact import CompactSegmentation, compact
from ..trident_core.config import (
    CORRELATIONS,
    MASK_PROMPT_MODES,
    MIN_SHORT_SIDE,
    MIN_STRIDE,
    PARADIGMS,
    SAM_TILE_CHOICES,
    AggregateConfig,
    Params,
    RefineConfig,
    WindowConfig,
)
from ..trident_core.image import require_same_image, require_size, to_rgb_uint8
from ..trident_core.pamr import MAX_STEPS as MAX_PAMR_STEPS
from ..trident_core.pamr import parse_dilations
from ..trident_core.pipeline import (
    Trident,
    compute_feature_map,
    compute_window_features,
    encode_image,
    guide_params,
    pamr_for,
    require_sam,
)
from ..trident_core.refine import refine
from ..trident_core.temporal import MAX_STRENGTH, FrameSmoother
from ..trident_core.text import encode_classes
from ..trident_core.window_features import WindowFeatures
from . import sockets as T
from .comfy_bridge import count_progress, each_image, each_result, free_memory, io, to_intermediate
from .preset_choice import PRESET_CHOICES, class_preset, preset_input, preset_name, preset_params

P = Params()
W, A, C, R = P.windows, P.aggregation, P.classification, P.refinement  # each stage's defaults

CLASSES_TIP = ("Class names separated by commas or line breaks; ';' between synonyms of one class, e.g. 'sky, "
               "horse; pony, grass'. All are foreground classes. Each pixel gets its most likely class; under a "
               "probability threshold (prob_thd: 0 in the default preset, 0.2 in voc21) it is left unlabeled (or "
               "gets the background class when there is one).")
BACKGROUND_TIP = ("Optional names of one background class (label 0), e.g. 'sky; wall; floor' (commas work too: "
                  "all are that one class). It is one more class to choose from, and pixels under the probability "
                  "threshold (prob_thd) get it instead of no label.")
IMAGE_TIP = ("The image(s) to segment; a batch (video frames) is processed frame by frame, each frame's "
             "intermediates freed before the next.")
SAM_TILES_TIP = ("SAM encodes the image in rows x cols tiles: 1x1 the whole image (the method's default), 1x2 "
                 "left/right halves (the reference's Cityscapes mode, for wide images), auto = tiles about square.")


PAMR_STEPS_TIP = ("PAMR steps on the logits before the label map (edges follow the image's colours; 0 = off, as in "
                  "every benchmark configuration).")
CLIP_TIP = "The CLIP model from Trident Load CLIP."
SMOOTHING_TIP = ("Video frames: each frame's class probabilities blended with the previous frames' (carried along "
                 "the optical flow between the frames; hidden and newly visible pixels take the frame alone), so "
                 "labels hold still instead of flickering. It trades lag on fast changes: a pixel whose class truly "
                 "changes keeps its old label a few frames (1 at 0.5, 3 at 0.8, 6 at 0.9). 0 = off, every frame "
                 "exactly as a single image; the first frame is never changed.")


def smoothing_input() -> object:
    """The temporal smoothing strength (Segment and Classify take it, after their other inputs)."""
    return io.Float.Input("temporal_smoothing", default=0.0, min=0.0, max=MAX_STRENGTH, step=0.05,
                          tooltip=SMOOTHING_TIP, optional=True)
DINO_TIP = "The DINO model from Trident Load DINO."


def _batch(image: torch.Tensor, n: int, what: str) -> None:
    """Refuse an image batch that does not match the batch a previous stage was run on."""
    if image.shape[0] != n:
        raise ValueError(f"the image batch has {image.shape[0]} image(s) but the {what} was made from {n}; "
                         "connect the same image")


class EncodeClasses(io.ComfyNode):
    """Text stage (S1)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentEncodeClasses", "Trident Encode Classes",
            ("Encodes class names with CLIP (80 prompt templates per name, averaged). Kept in ComfyUI's "
             "cache, so changing only the image does not encode the text again."),
            inputs=[
                T.CLIP.Input("clip", tooltip=CLIP_TIP),
                io.String.Input("classes", multiline=True, default="sky, person, grass", tooltip=CLASSES_TIP),
                io.String.Input("background", default="", tooltip=BACKGROUND_TIP, optional=True),
            ],
            outputs=[T.output(T.CLASSES, "classes", "The class list and its CLIP text embeddings.")])

    @classmethod
    def validate_inputs(cls, classes: str | None = None, background: str | None = None) -> bool | str:
        return classes is None or T.refusal(lambda: parse_classes(classes, background or None))

    @classmethod
    def execute(cls, clip: T.ModelHandle, classes: str, background: str = "") -> io.NodeOutput:
        cl = parse_classes(classes, background or None)
        T.ready(clip)
        return io.NodeOutput(to_intermediate(T.EncodedClasses(cl, encode_classes(clip.model, cl, count_progress()),
                                                                 clip.model.identity)))


class WindowFeaturesNode(io.ComfyNode):
    """S0, S2-S4: windows and CLIP's DINO-guided features."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentWindowFeatures", "Trident Window Features",
            ("Rescales the image, cuts it into sliding windows and runs CLIP on each window with DINO's "
             "token similarities as the last block's attention (the method's window features)."),
            inputs=[
                io.Image.Input("image", tooltip=IMAGE_TIP),
                T.CLIP.Input("clip", tooltip=CLIP_TIP),
                T.DINO.Input("dino", tooltip=DINO_TIP),
                T.short_side_input("The image's short side is scaled to this many pixels first (448 default; "
                                   "336-688 in the benchmark presets)."),
                io.Int.Input("window", default=W.window, min=112, max=1024, step=16,
                             tooltip="Window size in pixels (a multiple of both models' patch sizes; 336)."),
                io.Int.Input("stride", default=W.stride, min=MIN_STRIDE, max=1024, step=16,
                             tooltip="Step between windows in pixels (224; 112 gives more overlap)."),
            ],
            outputs=[T.output(T.WINDOW_FEATURES, "window_features",
                              "CLIP's last-block features of every window, one set per batch image.")])

    @classmethod
    def execute(cls, image: torch.Tensor, clip: T.ModelHandle, dino: T.ModelHandle, short_side: int, window: int,
                stride: int) -> io.NodeOutput:
        T.images(image)
        config = WindowConfig(short_side=short_side, window=window, stride=stride)
        T.ready(clip, dino)
        items = each_image(lambda img, progress: to_intermediate(
            compute_window_features(clip.model, dino.model, img, config, progress)), image)
        return io.NodeOutput(T.WindowFeatureBatch(tuple(items), clip))


class SpliceAggregate(io.ComfyNode):
    """S5-S7: splice the windows, aggregate with SAM's affinity, project to CLIP's text space."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentSpliceAggregate", "Trident Splice & Aggregate",
            ("Splices the window features into one map, spreads them over the whole image with SAM's "
             "affinity (splice-then-segment) and projects them into CLIP's text space. "
             "segment_then_splice is the ProxyCLIP baseline: windows projected on their own, no SAM."),
            inputs=[
                T.WINDOW_FEATURES.Input("window_features", tooltip="From Trident Window Features."),
                io.Image.Input("image", tooltip="The same image the window features were made from (SAM encodes "
                                                "it)."),
                io.Combo.Input("correlation", options=list(CORRELATIONS), default=A.correlation,
                               tooltip="How tokens are related: affinity (SAM attention where value cosines pass a "
                                       "threshold, the method), attention (SAM attention), cosine (value cosines), "
                                       "none (no aggregation)."),
                io.Combo.Input("paradigm", options=list(PARADIGMS), default=A.paradigm,
                               tooltip="splice_then_segment (the method) or segment_then_splice (the ProxyCLIP "
                                       "baseline)."),
                io.Combo.Input("sam_tiles", options=list(SAM_TILE_CHOICES), default=A.sam_tiles, tooltip=SAM_TILES_TIP),
                *T.aggregation_inputs("Threshold factor: a token pair counts when its value cosine exceeds cos_fac x "
                                     "the row's mean cosine (1.2; 0 keeps all positive ones).",
                                     "Keep a negative threshold as it is (on) or raise it to 0.6 (off, as the "
                                     "Cityscapes and ADE20K presets do)."),
                T.SAM.Input("sam", tooltip="The SAM model from Trident Load SAM (needed by splice_then_segment; "
                                           "segment_then_splice runs without it).", optional=True),
            ],
            outputs=[
                T.output(T.FEATURE_MAP, "feature_map",
                         "Per-token features in CLIP's embedding space, one map per batch image."),
                T.output(T.SAM_ENCODING, "sam_encoding",
                         "SAM's encoding of each batch image's tiles (none with segment_then_splice): connect it to "
                         "Trident SAM Refine (1x1 tiles) or Inspect Point Affinity so SAM does not encode again."),
            ])

    @classmethod
    def execute(cls, window_features: T.WindowFeatureBatch, image: torch.Tensor, correlation: str, paradigm: str,
                sam_tiles: str, cos_fac: float, refine_neg_cos: bool,
                sam: T.ModelHandle | None = None) -> io.NodeOutput:
        T.images(image)
        _batch(image, len(T.items(window_features.items, "window features")), "window features")
        config = AggregateConfig(paradigm=paradigm, correlation=correlation, sam_tiles=sam_tiles, cos_fac=cos_fac,
                                 refine_neg_cos=refine_neg_cos)
        require_sam(sam, Params(aggregation=config))
        T.ready(window_features.clip, *([sam] if config.uses_sam else []))
        clip, sam_model = window_features.clip.model, sam.model if config.uses_sam else None

        def one(wf: WindowFeatures, img: torch.Tensor, progress: object) -> tuple[FeatureMap, object]:
            if tuple(img.shape[:2]) != tuple(wf.image_size):
                raise ValueError(f"the image is {img.shape[1]}x{img.shape[0]} but the window features were made "
                                 f"from a {wf.image_size[1]}x{wf.image_size[0]} image: connect the same image to "
                                 "Window Features and Splice & Aggregate")
            encodings = encode_image(sam_model, img, config, progress)
            fm = compute_feature_map(wf, clip, sam_model, encodings, config, progress)
            return to_intermediate(fm), to_intermediate(encodings)

        maps, encodings = zip(*each_image(one, window_features.items, image))
        return io.NodeOutput(list(maps), list(encodings))


class Classify(io.ComfyNode):
    """S8: compare the feature map with the class texts."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentClassify", "Trident Classify",
            ("Cosine of every token with every class name, upsampled to the image, softmax over the "
             "names (a class takes the best of its synonyms): the coarse segmentation."),
            inputs=[
                T.FEATURE_MAP.Input("feature_map", tooltip="From Trident Splice & Aggregate."),
                T.CLASSES.Input("classes", tooltip="From Trident Encode Classes (with the same CLIP)."),
                io.Float.Input("logit_scale", default=C.logit_scale, min=1.0, max=200.0, step=1.0,
                               tooltip="Softmax temperature: cosines are multiplied by this (40)."),
                io.Float.Input("prob_thd", default=C.prob_thd, min=0.0, max=1.0, step=0.01,
                               tooltip="Pixels whose best class probability is below this get the background "
                                       "class, or no label when there is none (0 = off)."),
                io.Image.Input("image", tooltip="The segmented image; needed only for PAMR (its guide).",
                               optional=True),
                io.Int.Input("pamr_steps", default=0, min=0, max=MAX_PAMR_STEPS, tooltip=PAMR_STEPS_TIP,
                             optional=True),
                io.String.Input("pamr_dilations", default=",".join(map(str, C.pamr_dilations)),
                                tooltip="PAMR's neighbour distances in pixels, comma-separated (8,16).", optional=True),
                T.short_side_input("PAMR's guide is the image at this short side, as the reference's: 0 (default) "
                                   f"= the one Window Features used, else {MIN_SHORT_SIDE} or more.", optional=True,
                                   same=True),
                smoothing_input(),
            ],
            outputs=[T.output(T.SEGMENTATION, "segmentation",
                              "Labels and class probabilities at the image's size, one per batch image.")])

    @classmethod
    def validate_inputs(cls, pamr_dilations: str | None = None, short_side: int | None = None) -> bool | str:
        if short_side and short_side < MIN_SHORT_SIDE:  # (the widget steps by 16 from 0: one click up is 16)
            return (f"short_side {short_side}: 0 (the one Window Features used) or a short side of at least "
                    f"{MIN_SHORT_SIDE} for PAMR's guide")
        return pamr_dilations is None or T.refusal(lambda: parse_dilations(pamr_dilations))

    @classmethod
    def execute(cls, feature_map: list, classes: T.EncodedClasses, logit_scale: float, prob_thd: float,
                image: torch.Tensor | None = None, pamr_steps: int = 0, pamr_dilations: str = "8,16",
                short_side: int = 0, temporal_smoothing: float = 0.0) -> io.NodeOutput:
        params = P.update(logit_scale=logit_scale, prob_thd=prob_thd, pamr_steps=pamr_steps,
                          pamr_dilations=parse_dilations(pamr_dilations), short_side=short_side or None)
        smoother = FrameSmoother(temporal_smoothing, prob_thd)
        for need, what, setting in ((pamr_steps, "PAMR", "pamr_steps"),
                                    (temporal_smoothing, "temporal smoothing", "temporal_smoothing")):
            if need and image is None:
                raise ValueError(f"{what} needs the image: connect the segmented image to Trident Classify, or set "
                                 f"{setting} to 0")
        if image is not None:
            _batch(T.images(image), len(feature_map), "feature map")
        config = params.classification

        def one(i: int, fm: object, _progress: object) -> CompactSegmentation:
            if image is not None and (pamr_steps or temporal_smoothing):
                img = to_rgb_uint8(image[i])
                require_size(img, fm.image_size, "feature map")
                require_same_image(img, fm.image_digest, "feature map")
            pamr = pamr_for(image[i], guide_params(params, fm, short_side)) if pamr_steps else None
            seg = classify(fm, classes.text, classes.classes, config, pamr, classes.made_by)
            if temporal_smoothing:
                seg = smoother(seg, to_rgb_uint8(image[i]))
            return to_intermediate(compact(seg, logit_scale, prob_thd))

        return io.NodeOutput(each_image(one, range(len(feature_map)), T.items(feature_map, "feature map")))


class SamRefine(io.ComfyNode):
    """S9: SAM refinement of a coarse segmentation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentSamRefine", "Trident SAM Refine",
            ("Prompts SAM with each confident class region's best point, its box and the class's "
             "probability as a mask; masks SAM is sure of (IoU) replace the coarse labels where they lie."),
            inputs=[
                T.SEGMENTATION.Input("segmentation", tooltip="The coarse segmentation from Trident Classify."),
                T.SAM.Input("sam", tooltip="The SAM model from Trident Load SAM."),
                io.Image.Input("image", tooltip="The segmented image. SAM encodes it here unless Splice & "
                                                "Aggregate's sam_encoding (1x1 tiles) is connected."),
                io.Float.Input("coarse_thresh", default=R.coarse_thresh, min=0.0, max=1.0, step=0.01,
                               tooltip="Classes and pixels below this probability are not prompted."),
                io.Int.Input("minimal_area", default=R.minimal_area, min=0, max=1 << 20,
                             tooltip="Smallest region prompted, in half-resolution pixels (225)."),
                io.Float.Input("mask_alpha", default=R.mask_alpha, min=0.0, max=1.0, step=0.001,
                               tooltip="Scale of the class probability given to SAM as mask prompt (0.005)."),
                io.Float.Input("iou_thresh", default=R.iou_thresh, min=0.0, max=1.0, step=0.01,
                               tooltip="A SAM mask is kept when its predicted IoU is above this (0.8)."),
                io.Combo.Input("mask_prompt_mode", options=list(MASK_PROMPT_MODES), default=R.mask_prompt_mode,
                               tooltip="reference: the mask prompt as the authors pass it (3-D; their numbers); "
                                       "batched: the corrected 4-D call."),
                T.SAM_ENCODING.Input("sam_encoding", tooltip="Splice & Aggregate's sam_encoding of the same images: "
                                                             "reused when its SAM tiles were 1x1 (saves encoding the "
                                                             "image again).", optional=True),
            ],
            outputs=[T.output(T.SEGMENTATION, "segmentation",
                              "The refined segmentation (the coarse one is kept inside it for inspection; the "
                              "refined scores in float16).")])

    @classmethod
    def execute(cls, segmentation: list, sam: T.ModelHandle, image: torch.Tensor, coarse_thresh: float,
                minimal_area: int, mask_alpha: float, iou_thresh: float, mask_prompt_mode: str,
                sam_encoding: list | None = None) -> io.NodeOutput:
        T.images(image)
        _batch(image, len(T.items(segmentation, "segmentation")), "segmentation")
        config = RefineConfig(coarse_thresh=coarse_thresh, minimal_area=minimal_area, mask_alpha=mask_alpha,
                              iou_thresh=iou_thresh, mask_prompt_mode=mask_prompt_mode)
        T.ready(sam)

        encodings = sam_encoding if sam_encoding is not None else [None] * len(segmentation)
        _batch(image, len(encodings), "SAM encoding")

        def one(seg: CompactSegmentation, img: torch.Tensor, enc: object, progress: object) -> CompactSegmentation:
            whole = enc.whole if enc is not None else None
            refined = refine(seg, sam.model, to_rgb_uint8(img), config, whole, on_class=progress)
            return to_intermediate(compact(refined, seg.logit_scale, seg.prob_thd))

        return io.NodeOutput(each_image(one, segmentation, image, encodings))


class TridentSegment(io.ComfyNode):
    """The whole method in one node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentSegment", "Trident Segment",
            ("Training-free open-vocabulary segmentation (Trident: CLIP + DINO + SAM): type class names, "
             "get a label map. All stages in one node with a preset's parameters; use the stage nodes to "
             "change each parameter."),
            inputs=[
                io.Image.Input("image", tooltip=IMAGE_TIP),
                T.CLIP.Input("clip", tooltip=CLIP_TIP),
                T.DINO.Input("dino", tooltip=DINO_TIP),
                io.String.Input("classes", multiline=True, default="sky, person, grass",
                                tooltip=CLASSES_TIP + " Empty with a benchmark preset: the dataset's classes. voc21, "
                                        "context60 and coco_object add their own background class (label 0) unless "
                                        "'background' is given."),
                preset_input(),
                io.Boolean.Input("refine", default=True,
                                 tooltip="SAM refinement of the coarse labels (sharper edges; takes longer)."),
                io.Combo.Input("sam_tiles", options=["preset", *SAM_TILE_CHOICES], default="preset",
                               tooltip=SAM_TILES_TIP + " preset = the preset's choice."),
                T.SAM.Input("sam", tooltip="The SAM model from Trident Load SAM (every preset uses it).",
                            optional=True),
                io.String.Input("background", default="", tooltip=BACKGROUND_TIP, optional=True),
                io.Int.Input("pamr_steps", default=0, min=0, max=MAX_PAMR_STEPS, tooltip=PAMR_STEPS_TIP,
                             optional=True),
                smoothing_input(),
            ],
            outputs=[T.output(T.SEGMENTATION, "segmentation",
                              "Labels and class probabilities at the image's size, one per batch image (kept small: "
                              "the labels, the low-resolution logits the probabilities are recomputed from, refined "
                              "scores in float16; no SAM encoding).")])

    @classmethod
    def validate_inputs(cls, classes: str | None = None, preset: str | dict | None = None,
                        background: str | None = None) -> bool | str:
        """The preset's name (ComfyUI does not check a DynamicCombo's choice) and the class names against it."""
        name = preset_name(preset)
        if name is not None and name not in PRESET_CHOICES:
            return f"preset {name!r} is not one of {', '.join(PRESET_CHOICES)}: choose one of them"
        if classes is None or name is None:
            return True
        return T.refusal(lambda: class_preset(name).class_list(classes, background or ""))

    @classmethod
    def execute(cls, image: torch.Tensor, clip: T.ModelHandle, dino: T.ModelHandle, classes: str,
                preset: str | dict, refine: bool, sam_tiles: str, sam: T.ModelHandle | None = None,
                background: str = "", pamr_steps: int = 0, temporal_smoothing: float = 0.0) -> io.NodeOutput:
        T.images(image)
        cl = class_preset(preset_name(preset)).class_list(classes, background)
        params = preset_params(preset).update(refine=refine, sam_tiles=None if sam_tiles == "preset" else sam_tiles,
                                              pamr_steps=pamr_steps)
        require_sam(sam, params, "connect one (Trident Load SAM) to the 'sam' input: every preset uses it")
        T.ready(clip, dino, *([sam] if sam else []))
        trident = Trident(clip.model, dino.model, sam.model if sam else None)
        config = params.classification
        smoother = FrameSmoother(temporal_smoothing, config.prob_thd)
        in_order = iter(image)  # the frames the smoothing hook sees: it runs once per frame, in order
        hook = (lambda seg: smoother(seg, to_rgb_uint8(next(in_order)))) if temporal_smoothing else None
        # several frames per forward on a GPU (1 on the CPU); the text is encoded once, then taken from the CLIP's
        # cache; smoothing before refinement
        per_forward = trident.frames_per_forward(params, tuple(image.shape[1:3]), free_memory(trident.clip.device))

        def frames(progress: object) -> Iterator[CompactSegmentation]:
            for full in trident.segment_frames(image, cl, params, progress, hook, per_forward):
                kept = to_intermediate(compact(full, config.logit_scale, config.prob_thd))
                del full  # (the full-size maps: freed before the next frame starts)
                yield kept

        return io.NodeOutput(each_result(frames, len(image)))


NODES = (EncodeClasses, WindowFeaturesNode, SpliceAggregate, Classify, SamRefine, TridentSegment)
