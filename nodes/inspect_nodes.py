"""Look inside the method: a feature map's principal components, one class's probability, one pixel's SAM
affinity (the paper's Figure 3). Pictures as IMAGE, values as MASK, at the image's size."""

from __future__ import annotations

import torch

from ..trident_core.config import CORRELATIONS, AggregateConfig
from ..trident_core.image import to_rgb_uint8
from ..trident_core.inspection import (
    POINT_UNITS,
    class_probability,
    heat_rgb,
    inspection_encodings,
    mark_point,
    pca_rgb,
    point_affinity,
    point_to_pixels,
)
from . import sockets as T
from .comfy_bridge import each_image, intermediate_device

A = AggregateConfig()  # the defaults of Splice & Aggregate


def _out(*batches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    dev = intermediate_device()
    return tuple(torch.stack(b).to(dev) for b in batches)


class InspectFeatures:
    """PCA picture of a feature map."""

    CATEGORY = T.CATEGORY
    FUNCTION = "inspect"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pca",)
    OUTPUT_TOOLTIPS = ("The first three principal components of the tokens as red, green and blue.",)
    DESCRIPTION = ("Shows a feature map as colours: tokens with similar features get similar colours. Compare "
                   "splice_then_segment with segment_then_splice, or the correlation modes.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"feature_map": (T.FEATURE_MAP, {"tooltip": "From Trident Splice & Aggregate."})}}

    def inspect(self, feature_map: list) -> tuple[torch.Tensor]:
        return _out(each_image(lambda fm, _progress: pca_rgb(fm.features, fm.image_size),
                               T.items(feature_map, "feature map")))


class InspectClassProbability:
    """Heat map of one class's probability."""

    CATEGORY = T.CATEGORY
    FUNCTION = "inspect"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heat_map", "probability")
    OUTPUT_TOOLTIPS = ("The class's probability as colours (black 0, yellow 1).", "The probability as a MASK.")
    DESCRIPTION = "Shows how sure the segmentation is of one class at every pixel, before or after SAM refinement."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "segmentation": (T.SEGMENTATION, {"tooltip": "From Trident Segment, Classify or SAM Refine."}),
            "class_name": ("STRING", {"default": "person", "tooltip": "One class's name (any synonym, any case)."}),
            "coarse": ("BOOLEAN", {"default": False, "tooltip": "Show the probability from before SAM refinement "
                                                               "(the same map when there was no refinement)."}),
        }}

    def inspect(self, segmentation: list, class_name: str, coarse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probs = each_image(lambda seg, _progress: class_probability(seg, class_name, coarse),
                           T.items(segmentation, "segmentation"))
        return _out([heat_rgb(p) for p in probs], [p.cpu() for p in probs])


class InspectPointAffinity:
    """Heat map of one pixel's SAM affinity."""

    CATEGORY = T.CATEGORY
    FUNCTION = "inspect"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heat_map", "affinity")
    OUTPUT_TOOLTIPS = ("The chosen token's correlation with every other token (scaled to max 1), point ringed.",
                       "The same values as a MASK.")
    DESCRIPTION = ("Shows which pixels SAM's affinity lets one point draw features from (the paper's Figure 3): "
                   "the row of the correlation matrix at the token under (x, y).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "feature_map": (T.FEATURE_MAP, {"tooltip": "From Trident Splice & Aggregate (the image's size)."}),
            "sam": (T.SAM, {"tooltip": "The SAM model from Trident Load SAM."}),
            "x": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 16384.0, "step": 0.01,
                            "tooltip": "Horizontal position: a fraction of the width (0..1) or pixels (see units)."}),
            "y": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 16384.0, "step": 0.01,
                            "tooltip": "Vertical position: a fraction of the height (0..1) or pixels (see units)."}),
            "units": (list(POINT_UNITS), {"default": "fraction", "tooltip": "Whether x and y are fractions of the "
                                                                          "image's size or pixels."}),
            "correlation": ([c for c in CORRELATIONS if c != "none"], {
                "default": A.correlation, "tooltip": "Which correlation to show (affinity is the method's)."}),
            "cos_fac": ("FLOAT", {"default": A.cos_fac, "min": -10.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Threshold factor of the affinity, as in Splice & Aggregate."}),
            "refine_neg_cos": ("BOOLEAN", {"default": A.refine_neg_cos,
                                           "tooltip": "As in Splice & Aggregate."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The segmented image; SAM encodes it (one tile) when no sam_encoding "
                                           "is connected."}),
            "sam_encoding": (T.SAM_ENCODING, {"tooltip": "Splice & Aggregate's sam_encoding: its SAM tiles are "
                                                         "shown as they were used, without encoding again."}),
        }}

    def inspect(self, feature_map: list, sam: T.ModelHandle, x: float, y: float, units: str, correlation: str,
                cos_fac: float, refine_neg_cos: bool,
                image: torch.Tensor | None = None,
                sam_encoding: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        T.items(feature_map, "feature map")
        if image is not None:
            T.images(image)
        encodings = sam_encoding if sam_encoding is not None else [None] * len(feature_map)
        if len(encodings) != len(feature_map):
            raise ValueError(f"the sam_encoding holds {len(encodings)} image(s) but the feature map "
                             f"{len(feature_map)}: connect both outputs of the same Splice & Aggregate")
        if sam_encoding is None and image is not None and image.shape[0] != len(feature_map):
            raise ValueError(f"{image.shape[0]} image(s) for a feature map of {len(feature_map)}: connect the image "
                             "that was segmented (the whole batch)")
        T.ready(sam)
        same_batch = image is not None and image.shape[0] == len(feature_map)

        def one(b: int, fm: object, enc: object, _progress: object) -> tuple[torch.Tensor, torch.Tensor]:
            tiles = inspection_encodings(enc, sam.model, to_rgb_uint8(image[b]) if same_batch else None,
                                         fm.image_size)
            point = point_to_pixels(x, y, units, fm.image_size)
            amap = point_affinity(tiles, sam.model, fm.image_size, point, correlation, cos_fac, refine_neg_cos)
            return mark_point(heat_rgb(amap), point), amap

        heat, values = zip(*each_image(one, range(len(feature_map)), feature_map, encodings))
        return _out(list(heat), list(values))


NODE_CLASS_MAPPINGS = {"TridentInspectFeatures": InspectFeatures,
                       "TridentInspectClassProbability": InspectClassProbability,
                       "TridentInspectPointAffinity": InspectPointAffinity}
NODE_DISPLAY_NAME_MAPPINGS = {"TridentInspectFeatures": "Trident Inspect Features (PCA)",
                              "TridentInspectClassProbability": "Trident Inspect Class Probability",
                              "TridentInspectPointAffinity": "Trident Inspect Point Affinity"}
