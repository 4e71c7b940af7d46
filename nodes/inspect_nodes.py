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
from .comfy_bridge import each_image, intermediate_device, io

A = AggregateConfig()  # the defaults of Splice & Aggregate


def _out(*batches: list[torch.Tensor]) -> io.NodeOutput:
    dev = intermediate_device()
    return io.NodeOutput(*(torch.stack(b).to(dev) for b in batches))


class InspectFeatures(io.ComfyNode):
    """PCA picture of a feature map."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentInspectFeatures", "Trident Inspect Features (PCA)",
            ("Shows a feature map as colours: tokens with similar features get similar colours. Compare "
             "splice_then_segment with segment_then_splice, or the correlation modes."),
            inputs=[T.FEATURE_MAP.Input("feature_map", tooltip="From Trident Splice & Aggregate.")],
            outputs=[T.output(io.Image, "pca",
                              "The first three principal components of the tokens as red, green and blue.")])

    @classmethod
    def execute(cls, feature_map: list) -> io.NodeOutput:
        return _out(each_image(lambda fm, _progress: pca_rgb(fm.features, fm.image_size),
                               T.items(feature_map, "feature map")))


class InspectClassProbability(io.ComfyNode):
    """Heat map of one class's probability."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentInspectClassProbability", "Trident Inspect Class Probability",
            ("Shows how sure the segmentation is of one class at every pixel, before or after SAM "
             "refinement."),
            inputs=[
                T.SEGMENTATION.Input("segmentation", tooltip=T.SEGMENTATION_TIP),
                io.String.Input("class_name", default="person", tooltip="One class's name (any synonym, any case)."),
                io.Boolean.Input("coarse", default=False, tooltip="Show the probability from before SAM refinement "
                                                                  "(the same map when there was no refinement)."),
            ],
            outputs=[T.output(io.Image, "heat_map", "The class's probability as colours (black 0, yellow 1)."),
                     T.output(io.Mask, "probability", "The probability as a MASK.")])

    @classmethod
    def execute(cls, segmentation: list, class_name: str, coarse: bool) -> io.NodeOutput:
        probs = each_image(lambda seg, _progress: class_probability(seg, class_name, coarse),
                           T.items(segmentation, "segmentation"))
        return _out([heat_rgb(p) for p in probs], [p.cpu() for p in probs])


class InspectPointAffinity(io.ComfyNode):
    """Heat map of one pixel's SAM affinity."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentInspectPointAffinity", "Trident Inspect Point Affinity",
            ("Shows which pixels SAM's affinity lets one point draw features from (the paper's Figure "
             "3): the row of the correlation matrix at the token under (x, y)."),
            inputs=[
                T.FEATURE_MAP.Input("feature_map", tooltip="From Trident Splice & Aggregate (the image's size)."),
                T.SAM.Input("sam", tooltip="The SAM model from Trident Load SAM."),
                io.Float.Input("x", default=0.5, min=0.0, max=16384.0, step=0.01,
                               tooltip="Horizontal position: a fraction of the width (0..1) or pixels (see units)."),
                io.Float.Input("y", default=0.5, min=0.0, max=16384.0, step=0.01,
                               tooltip="Vertical position: a fraction of the height (0..1) or pixels (see units)."),
                io.Combo.Input("units", options=list(POINT_UNITS), default="fraction",
                               tooltip="Whether x and y are fractions of the image's size or pixels."),
                io.Combo.Input("correlation", options=[c for c in CORRELATIONS if c != "none"], default=A.correlation,
                               tooltip="Which correlation to show (affinity is the method's)."),
                *T.aggregation_inputs("Threshold factor of the affinity, as in Splice & Aggregate.",
                                      "As in Splice & Aggregate."),
                io.Image.Input("image", tooltip="The segmented image; SAM encodes it (one tile) when no sam_encoding "
                                                "is connected.", optional=True),
                T.SAM_ENCODING.Input("sam_encoding", tooltip="Splice & Aggregate's sam_encoding: its SAM tiles are "
                                                             "shown as they were used, without encoding again.",
                                     optional=True),
            ],
            outputs=[T.output(io.Image, "heat_map", "The chosen token's correlation with every other token (scaled "
                                                    "to max 1), point ringed."),
                     T.output(io.Mask, "affinity", "The same values as a MASK.")])

    @classmethod
    def execute(cls, feature_map: list, sam: T.ModelHandle, x: float, y: float, units: str, correlation: str,
                cos_fac: float, refine_neg_cos: bool, image: torch.Tensor | None = None,
                sam_encoding: list | None = None) -> io.NodeOutput:
        T.items(feature_map, "feature map")
        if image is not None:
            T.images(image)
        encodings = sam_encoding if sam_encoding is not None else [None] * len(feature_map)
        if len(encodings) != len(feature_map):
            raise ValueError(f"the sam_encoding holds {len(encodings)} image(s) but the feature map "
                             f"{len(feature_map)}: connect both outputs of the same Splice & Aggregate")
        if image is not None and image.shape[0] != len(feature_map):
            raise ValueError(f"{image.shape[0]} image(s) for a feature map of {len(feature_map)}: connect the image "
                             "that was segmented (the whole batch)")
        T.ready(sam)

        def one(b: int, fm: object, enc: object, _progress: object) -> tuple[torch.Tensor, torch.Tensor]:
            tiles = inspection_encodings(enc, sam.model, to_rgb_uint8(image[b]) if image is not None else None,
                                         fm.image_size, fm.image_digest)
            point = point_to_pixels(x, y, units, fm.image_size)
            amap = point_affinity(tiles, sam.model, fm.image_size, point, correlation, cos_fac, refine_neg_cos)
            return mark_point(heat_rgb(amap), point), amap

        heat, values = zip(*each_image(one, range(len(feature_map)), feature_map, encodings))
        return _out(list(heat), list(values))


NODES = (InspectFeatures, InspectClassProbability, InspectPointAffinity)
