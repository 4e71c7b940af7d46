"""From a segmentation to what other nodes use: masks of named classes, and colour pictures with a legend."""

from __future__ import annotations

from itertools import accumulate

import numpy as np
import torch

from ..trident_core.classes import named_classes
from ..trident_core.image import to_rgb_uint8
from ..trident_core.render import masks_for, preview
from . import sockets as T
from .comfy_bridge import each_image, intermediate_device, io


def _image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 to a ComfyUI IMAGE element (float 0..1)."""
    return torch.from_numpy(rgb).float() / 255.0


class SegmentationToMasks(io.ComfyNode):
    """Masks out of a segmentation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentSegmentationToMasks", "Trident Segmentation to Masks",
            ("Turns a segmentation into MASKs at the image's size: the union of the classes you name (for "
             "inpainting, compositing...) and each of them as its own mask."),
            inputs=[
                T.SEGMENTATION.Input("segmentation", tooltip=T.SEGMENTATION_TIP),
                io.String.Input("classes", default="person",
                                tooltip="Names of the classes to put in the mask, separated by commas or line breaks "
                                        "(any synonym, any case). Empty = every class but the background."),
                io.Boolean.Input("invert", default=False,
                                 tooltip="Invert the mask (everything but those classes)."),
            ],
            outputs=[T.output(io.Mask, "mask", "The union of the named classes, one mask per batch image [B, H, W]."),
                     T.output(io.Mask, "class_masks", "One mask per named class, in the segmentation's class order, "
                                                      "for each batch image in turn [B x named classes, H, W] (not "
                                                      "inverted).")])

    @classmethod
    def execute(cls, segmentation: list, classes: str, invert: bool) -> io.NodeOutput:
        segmentation = T.items(segmentation, "segmentation")
        size = tuple(segmentation[0].image_size)
        if any(tuple(seg.image_size) != size for seg in segmentation):
            raise ValueError("the segmentations have different sizes; a MASK batch needs one size")
        dev = intermediate_device()
        # filled frame by frame: a batch of frames never holds its masks twice (a list and the stacked copy); only the
        # named classes' masks (a 150-class list over a clip: every class's would be 150 masks a frame)
        wanted = [named_classes(seg.classes, classes) for seg in segmentation]
        unions = torch.empty((len(segmentation), *size), device=dev)
        first_rows = list(accumulate((len(w) for w in wanted), initial=0))
        per_class = torch.empty((first_rows[-1], *size), device=dev)

        def one(b: int, seg: object, row: int, _progress: object) -> None:
            union = masks_for(seg.labels, wanted[b])
            unions[b] = 1.0 - union if invert else union
            for j, k in enumerate(wanted[b]):
                per_class[row + j] = masks_for(seg.labels, [k])

        each_image(one, range(len(segmentation)), segmentation, first_rows[:-1])
        return io.NodeOutput(unions, per_class)


class PreviewSegmentation(io.ComfyNode):
    """Colour pictures of a segmentation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentPreviewSegmentation", "Trident Preview Segmentation",
            ("Shows a segmentation as a colour label map and as an overlay on the image, each with a "
             "legend of the class colours below it (connect to Preview Image or Save Image)."),
            inputs=[
                T.SEGMENTATION.Input("segmentation", tooltip=T.SEGMENTATION_TIP),
                io.Image.Input("image", tooltip="The segmented image, for the overlay."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the colours in the overlay."),
                io.Boolean.Input("show_legend", default=True, tooltip="Add the class legend below both pictures "
                                                                      "(off: pictures at the image's size)."),
            ],
            outputs=[T.output(io.Image, "label_colors", "One colour per class (unlabeled pixels black)."),
                     T.output(io.Image, "overlay", "The colours blended over the image.")])

    @classmethod
    def execute(cls, segmentation: list, image: torch.Tensor, alpha: float, show_legend: bool) -> io.NodeOutput:
        if T.images(image).shape[0] != len(T.items(segmentation, "segmentation")):
            raise ValueError(f"{image.shape[0]} image(s) for {len(segmentation)} segmentation(s): connect the "
                             "segmented image")

        dev = intermediate_device()
        colors_out: torch.Tensor | None = None  # filled frame by frame: never a list and its stacked copy
        overlays: torch.Tensor | None = None

        def one(b: int, seg: object, img: torch.Tensor, _progress: object) -> None:
            nonlocal colors_out, overlays
            colors, blended = preview(seg.labels, seg.classes.names, to_rgb_uint8(img), alpha, show_legend)
            if colors_out is None:  # the legend decides the pictures' size, the same for every frame
                colors_out = torch.empty((len(segmentation), *colors.shape), device=dev)
                overlays = torch.empty((len(segmentation), *blended.shape), device=dev)
            colors_out[b], overlays[b] = _image(colors), _image(blended)

        each_image(one, range(len(segmentation)), segmentation, image)
        return io.NodeOutput(colors_out, overlays)


NODES = (SegmentationToMasks, PreviewSegmentation)
