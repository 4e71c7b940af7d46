"""One node per stage of the method (text, window features, splice & aggregate, classify, refine) and the
all-in-one Trident Segment node. Each runs a batch image by image; outputs go to ComfyUI's intermediate device."""

from __future__ import annotations

import torch

from ..trident_core.aggregation import FeatureMap
from ..trident_core.classes import parse_classes
from ..trident_core.classify import classify
from ..trident_core.compact import CompactSegmentation, compact
from ..trident_core.config import (
    CORRELATIONS,
    MASK_PROMPT_MODES,
    PARADIGMS,
    SAM_TILE_CHOICES,
    AggregateConfig,
    Params,
    RefineConfig,
    WindowConfig,
)
from ..trident_core.image import to_rgb_uint8
from ..trident_core.pamr import MAX_STEPS as MAX_PAMR_STEPS
from ..trident_core.pamr import parse_dilations
from ..trident_core.pipeline import (
    Trident,
    compute_feature_map,
    compute_window_features,
    encode_image,
    pamr_for,
    require_sam,
)
from ..trident_core.presets import PRESETS
from ..trident_core.refine import refine
from ..trident_core.text import encode_classes
from ..trident_core.window_features import WindowFeatures
from . import sockets as T
from .comfy_bridge import count_progress, each_image, to_intermediate

P = Params()
W, A, C, R = P.windows, P.aggregation, P.classification, P.refinement  # each stage's defaults

CLASSES_TIP = ("Class names separated by commas or line breaks; ';' between synonyms of one class, e.g. 'sky, "
               "horse; pony, grass'. All are foreground classes. Pixels where no class is confident are left "
               "unlabeled (or get the background class when there is one).")
BACKGROUND_TIP = ("Optional names of a background class (label 0), e.g. 'sky; wall; floor': pixels under the "
                  "probability threshold then get the background instead of no label.")
IMAGE_TIP = ("The image(s) to segment; a batch (video frames) is processed frame by frame, each frame's "
             "intermediates freed before the next.")
SAM_TILES_TIP = ("SAM encodes the image in rows x cols tiles: 1x1 the whole image (the method's default), 1x2 "
                 "left/right halves (the reference's Cityscapes mode, for wide images), auto = tiles about square.")


PAMR_STEPS_INPUT = {"default": 0, "min": 0, "max": MAX_PAMR_STEPS,
                    "tooltip": "PAMR steps on the logits before the label map (edges follow the image's colours; "
                               "0 = off, as in every benchmark configuration)."}


def _batch(image: torch.Tensor, n: int, what: str) -> None:
    """Refuse an image batch that does not match the batch a previous stage was run on."""
    if image.shape[0] != n:
        raise ValueError(f"the image batch has {image.shape[0]} image(s) but the {what} was made from {n}; "
                         "connect the same image")


class EncodeClasses:
    """Text stage (S1)."""

    CATEGORY = T.CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (T.CLASSES,)
    RETURN_NAMES = ("classes",)
    OUTPUT_TOOLTIPS = ("The class list and its CLIP text embeddings.",)
    DESCRIPTION = ("Encodes class names with CLIP (80 prompt templates per name, averaged). Kept in ComfyUI's cache, "
                   "so changing only the image does not encode the text again.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": (T.CLIP, {"tooltip": "The CLIP model from Trident Load CLIP."}),
            "classes": ("STRING", {"multiline": True, "default": "sky, person, grass", "tooltip": CLASSES_TIP}),
        }, "optional": {
            "background": ("STRING", {"default": "", "tooltip": BACKGROUND_TIP}),
        }}

    def encode(self, clip: T.ModelHandle, classes: str, background: str = "") -> tuple[T.EncodedClasses]:
        cl = parse_classes(classes, background or None)
        T.ready(clip)
        return (to_intermediate(T.EncodedClasses(cl, encode_classes(clip.model, cl, count_progress()))),)


class WindowFeaturesNode:
    """S0, S2-S4: windows and CLIP's DINO-guided features."""

    CATEGORY = T.CATEGORY
    FUNCTION = "compute"
    RETURN_TYPES = (T.WINDOW_FEATURES,)
    RETURN_NAMES = ("window_features",)
    OUTPUT_TOOLTIPS = ("CLIP's last-block features of every window, one set per batch image.",)
    DESCRIPTION = ("Rescales the image, cuts it into sliding windows and runs CLIP on each window with DINO's "
                   "token similarities as the last block's attention (the method's window features).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": IMAGE_TIP}),
            "clip": (T.CLIP, {"tooltip": "The CLIP model from Trident Load CLIP."}),
            "dino": (T.DINO, {"tooltip": "The DINO model from Trident Load DINO."}),
            "short_side": ("INT", {"default": W.short_side, "min": 112, "max": 2048, "step": 16,
                                   "tooltip": "The image's short side is scaled to this many pixels first "
                                              "(448 default; 336-688 in the benchmark presets)."}),
            "window": ("INT", {"default": W.window, "min": 112, "max": 1024, "step": 16,
                               "tooltip": "Window size in pixels (a multiple of both models' patch sizes; 336)."}),
            "stride": ("INT", {"default": W.stride, "min": 16, "max": 1024, "step": 16,
                               "tooltip": "Step between windows in pixels (224; 112 gives more overlap)."}),
        }}

    def compute(self, image: torch.Tensor, clip: T.ModelHandle, dino: T.ModelHandle, short_side: int, window: int,
                stride: int) -> tuple[T.WindowFeatureBatch]:
        T.images(image)
        config = WindowConfig(short_side=short_side, window=window, stride=stride)
        T.ready(clip, dino)
        items = each_image(lambda img, progress: to_intermediate(
            compute_window_features(clip.model, dino.model, img, config, progress)), image)
        return (T.WindowFeatureBatch(tuple(items), clip),)


class SpliceAggregate:
    """S5-S7: splice the windows, aggregate with SAM's affinity, project to CLIP's text space."""

    CATEGORY = T.CATEGORY
    FUNCTION = "aggregate"
    RETURN_TYPES = (T.FEATURE_MAP, T.SAM_ENCODING)
    RETURN_NAMES = ("feature_map", "sam_encoding")
    OUTPUT_TOOLTIPS = ("Per-token features in CLIP's embedding space, one map per batch image.",
                       "SAM's encoding of each batch image's tiles (none with segment_then_splice): connect it to "
                       "Trident SAM Refine (1x1 tiles) or Inspect Point Affinity so SAM does not encode again.")
    DESCRIPTION = ("Splices the window features into one map, spreads them over the whole image with SAM's "
                   "affinity (splice-then-segment) and projects them into CLIP's text space. "
                   "segment_then_splice is the ProxyCLIP baseline: windows projected on their own, no SAM.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "window_features": (T.WINDOW_FEATURES, {"tooltip": "From Trident Window Features."}),
            "image": ("IMAGE", {"tooltip": "The same image the window features were made from (SAM encodes it)."}),
            "correlation": (list(CORRELATIONS), {
                "default": A.correlation,
                "tooltip": "How tokens are related: affinity (SAM attention where value cosines pass a threshold, "
                           "the method), attention (SAM attention), cosine (value cosines), none (no aggregation)."}),
            "paradigm": (list(PARADIGMS), {
                "default": A.paradigm,
                "tooltip": "splice_then_segment (the method) or segment_then_splice (the ProxyCLIP baseline)."}),
            "sam_tiles": (list(SAM_TILE_CHOICES), {"default": A.sam_tiles, "tooltip": SAM_TILES_TIP}),
            "cos_fac": ("FLOAT", {"default": A.cos_fac, "min": -10.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Threshold factor: a token pair counts when its value cosine exceeds "
                                             "cos_fac x the row's mean cosine (1.2; 0 keeps all positive ones)."}),
            "refine_neg_cos": ("BOOLEAN", {"default": A.refine_neg_cos,
                                           "tooltip": "Keep a negative threshold as it is (on) or raise it to 0.6 "
                                                      "(off, as the Cityscapes and ADE20K presets do)."}),
        }, "optional": {
            "sam": (T.SAM, {"tooltip": "The SAM model from Trident Load SAM (needed by splice_then_segment; "
                                       "segment_then_splice runs without it)."}),
        }}

    def aggregate(self, window_features: T.WindowFeatureBatch, image: torch.Tensor, correlation: str, paradigm: str,
                  sam_tiles: str, cos_fac: float, refine_neg_cos: bool,
                  sam: T.ModelHandle | None = None) -> tuple[list]:
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
        return list(maps), list(encodings)


class Classify:
    """S8: compare the feature map with the class texts."""

    CATEGORY = T.CATEGORY
    FUNCTION = "classify"
    RETURN_TYPES = (T.SEGMENTATION,)
    RETURN_NAMES = ("segmentation",)
    OUTPUT_TOOLTIPS = ("Labels and class probabilities at the image's size, one per batch image.",)
    DESCRIPTION = ("Cosine of every token with every class name, upsampled to the image, softmax over the names "
                   "(a class takes the best of its synonyms): the coarse segmentation.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "feature_map": (T.FEATURE_MAP, {"tooltip": "From Trident Splice & Aggregate."}),
            "classes": (T.CLASSES, {"tooltip": "From Trident Encode Classes (with the same CLIP)."}),
            "logit_scale": ("FLOAT", {"default": C.logit_scale, "min": 1.0, "max": 200.0, "step": 1.0,
                                      "tooltip": "Softmax temperature: cosines are multiplied by this (40)."}),
            "prob_thd": ("FLOAT", {"default": C.prob_thd, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Pixels whose best class probability is below this get the "
                                              "background class, or no label when there is none (0 = off)."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The segmented image; needed only for PAMR (its guide)."}),
            "pamr_steps": ("INT", PAMR_STEPS_INPUT),
            "pamr_dilations": ("STRING", {"default": ",".join(map(str, C.pamr_dilations)),
                                          "tooltip": "PAMR's neighbour distances in pixels, comma-separated (8,16)."}),
            "short_side": ("INT", {"default": W.short_side, "min": 112, "max": 2048, "step": 16,
                                   "tooltip": "The short side the window features used (PAMR's guide is the image "
                                              "at this scale, as the reference's)."}),
        }}

    def classify(self, feature_map: list, classes: T.EncodedClasses, logit_scale: float, prob_thd: float,
                 image: torch.Tensor | None = None, pamr_steps: int = 0, pamr_dilations: str = "8,16",
                 short_side: int = W.short_side) -> tuple[list]:
        params = P.update(logit_scale=logit_scale, prob_thd=prob_thd, pamr_steps=pamr_steps,
                          pamr_dilations=parse_dilations(pamr_dilations), short_side=short_side)
        if pamr_steps and image is None:
            raise ValueError("PAMR needs the image: connect the segmented image to Trident Classify, or set "
                             "pamr_steps to 0")
        if image is not None:
            _batch(image, len(feature_map), "feature map")
        config = params.classification

        def one(i: int, fm: object, _progress: object) -> CompactSegmentation:
            pamr = pamr_for(image[i], params) if pamr_steps else None
            seg = classify(fm, classes.text, classes.classes, config, pamr)
            return to_intermediate(compact(seg, logit_scale, prob_thd))

        return (each_image(one, range(len(feature_map)), T.items(feature_map, "feature map")),)


class SamRefine:
    """S9: SAM refinement of a coarse segmentation."""

    CATEGORY = T.CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = (T.SEGMENTATION,)
    RETURN_NAMES = ("segmentation",)
    OUTPUT_TOOLTIPS = ("The refined segmentation (the coarse one is kept inside it for inspection; the refined "
                       "scores in float16).",)
    DESCRIPTION = ("Prompts SAM with each confident class region's best point, its box and the class's probability "
                   "as a mask; masks SAM is sure of (IoU) replace the coarse labels where they lie.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "segmentation": (T.SEGMENTATION, {"tooltip": "The coarse segmentation from Trident Classify."}),
            "sam": (T.SAM, {"tooltip": "The SAM model from Trident Load SAM."}),
            "image": ("IMAGE", {"tooltip": "The segmented image. SAM encodes it here unless Splice & Aggregate's "
                                           "sam_encoding (1x1 tiles) is connected."}),
            "coarse_thresh": ("FLOAT", {"default": R.coarse_thresh, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Classes and pixels below this probability are not prompted."}),
            "minimal_area": ("INT", {"default": R.minimal_area, "min": 0, "max": 1 << 20,
                                     "tooltip": "Smallest region prompted, in half-resolution pixels (225)."}),
            "mask_alpha": ("FLOAT", {"default": R.mask_alpha, "min": 0.0, "max": 1.0, "step": 0.001,
                                     "tooltip": "Scale of the class probability given to SAM as mask prompt (0.005)."}),
            "iou_thresh": ("FLOAT", {"default": R.iou_thresh, "min": 0.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "A SAM mask is kept when its predicted IoU is above this (0.8)."}),
            "mask_prompt_mode": (list(MASK_PROMPT_MODES), {
                "default": R.mask_prompt_mode,
                "tooltip": "reference: the mask prompt as the authors pass it (3-D; their numbers); batched: the "
                           "corrected 4-D call."}),
        }, "optional": {
            "sam_encoding": (T.SAM_ENCODING, {"tooltip": "Splice & Aggregate's sam_encoding of the same images: "
                                                         "reused when its SAM tiles were 1x1 (saves encoding the "
                                                         "image again)."}),
        }}

    def refine(self, segmentation: list, sam: T.ModelHandle, image: torch.Tensor, coarse_thresh: float,
               minimal_area: int, mask_alpha: float, iou_thresh: float, mask_prompt_mode: str,
               sam_encoding: list | None = None) -> tuple[list]:
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

        return (each_image(one, segmentation, image, encodings),)


class TridentSegment:
    """The whole method in one node."""

    CATEGORY = T.CATEGORY
    FUNCTION = "segment"
    RETURN_TYPES = (T.SEGMENTATION,)
    RETURN_NAMES = ("segmentation",)
    OUTPUT_TOOLTIPS = ("Labels and class probabilities at the image's size, one per batch image (kept small: the "
                       "labels, the low-resolution logits the probabilities are recomputed from, refined scores in "
                       "float16; no SAM encoding).",)
    DESCRIPTION = ("Training-free open-vocabulary segmentation (Trident: CLIP + DINO + SAM): type class names, get a "
                   "label map. All stages in one node with a preset's parameters; use the stage nodes to change "
                   "each parameter.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": IMAGE_TIP}),
            "clip": (T.CLIP, {"tooltip": "The CLIP model from Trident Load CLIP."}),
            "dino": (T.DINO, {"tooltip": "The DINO model from Trident Load DINO."}),
            "classes": ("STRING", {"multiline": True, "default": "sky, person, grass",
                                   "tooltip": CLASSES_TIP + " Empty with a benchmark preset: the dataset's classes. "
                                              "voc21, context60 and coco_object add their own background class "
                                              "(label 0) unless 'background' is given."}),
            "preset": (list(PRESETS), {
                "default": next(iter(PRESETS)),
                "tooltip": "Parameters: 'default' for everyday images, or a benchmark's configuration (voc21, "
                           "context60, coco_object, ... as in the paper)."}),
            "refine": ("BOOLEAN", {"default": True, "tooltip": "SAM refinement of the coarse labels (sharper edges; "
                                                               "takes longer)."}),
            "sam_tiles": (["preset", *SAM_TILE_CHOICES], {"default": "preset", "tooltip": SAM_TILES_TIP
                                                   + " preset = the preset's choice."}),
        }, "optional": {
            "sam": (T.SAM, {"tooltip": "The SAM model from Trident Load SAM (every preset uses it)."}),
            "background": ("STRING", {"default": "", "tooltip": BACKGROUND_TIP}),
            "pamr_steps": ("INT", PAMR_STEPS_INPUT),
        }}

    def segment(self, image: torch.Tensor, clip: T.ModelHandle, dino: T.ModelHandle, classes: str, preset: str,
                refine: bool, sam_tiles: str, sam: T.ModelHandle | None = None,
                background: str = "", pamr_steps: int = 0) -> tuple[list[CompactSegmentation]]:
        T.images(image)
        chosen = PRESETS[preset]
        cl = chosen.class_list(classes, background)
        params = chosen.params.update(refine=refine, sam_tiles=None if sam_tiles == "preset" else sam_tiles,
                                      pamr_steps=pamr_steps)
        require_sam(sam, params)
        T.ready(clip, dino, *([sam] if sam else []))
        trident = Trident(clip.model, dino.model, sam.model if sam else None)
        config = params.classification

        def one(img: torch.Tensor, progress: object) -> CompactSegmentation:
            # the text is encoded at the first frame, then taken from the CLIP's cache
            full = trident.segment(img, cl, params, progress)
            return to_intermediate(compact(full, config.logit_scale, config.prob_thd))

        return (each_image(one, image),)


NODE_CLASS_MAPPINGS = {
    "TridentEncodeClasses": EncodeClasses,
    "TridentWindowFeatures": WindowFeaturesNode,
    "TridentSpliceAggregate": SpliceAggregate,
    "TridentClassify": Classify,
    "TridentSamRefine": SamRefine,
    "TridentSegment": TridentSegment,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TridentEncodeClasses": "Trident Encode Classes",
    "TridentWindowFeatures": "Trident Window Features",
    "TridentSpliceAggregate": "Trident Splice & Aggregate",
    "TridentClassify": "Trident Classify",
    "TridentSamRefine": "Trident SAM Refine",
    "TridentSegment": "Trident Segment",
}
