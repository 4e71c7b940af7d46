"""Trident Instances: the chosen classes split into objects, as masks, boxes and Impact-Pack's SEGS."""

from __future__ import annotations

import json
import logging
from collections import namedtuple

import torch

from ..trident_core.instances import (
    Instance,
    check_crop_factor,
    check_max_objects,
    check_min_area,
    crop_region,
    find_largest_instances,
    object_classes,
)
from . import sockets as T
from .comfy_bridge import each_image, intermediate_device, io

# Impact-Pack's SEG (impact/core.py), rebuilt so the pack loads without Impact-Pack; its nodes read the fields by
# name. SEGS = ((H, W), [SEG, ...]).
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])


def _seg(obj: Instance, image: torch.Tensor, size: tuple[int, int], crop_factor: float) -> SEG:
    """An object as a SEG: the frame (as ComfyUI's IMAGE: 3 channels, float32) and the object's mask (float32
    numpy, as Impact-Pack keeps it) cut to the crop region."""
    x1, y1, x2, y2 = region = crop_region(obj.box, size, crop_factor)
    mask = obj.full_mask(size)[y1:y2, x1:x2].astype("float32")
    crop = image[obj.frame:obj.frame + 1, y1:y2, x1:x2, :]
    crop = crop[..., :3] if crop.shape[-1] >= 3 else crop[..., :1].expand(*crop.shape[:-1], 3)  # alpha, gray
    return SEG(crop.float().contiguous(), mask, obj.confidence, list(region), obj.box, obj.class_name, None)


class TridentInstances(io.ComfyNode):
    """Objects (connected regions) of chosen classes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return T.schema(
            "TridentInstances", "Trident Instances",
            ("Splits the chosen classes of a segmentation (after SAM refinement where it ran) into "
             "objects: each 8-connected region of a class with at least min_area pixels. Ordered by "
             "frame, class, then the region's top-most, left-most pixel."),
            inputs=[
                T.SEGMENTATION.Input("segmentation", tooltip=T.SEGMENTATION_TIP),
                io.Image.Input("image", tooltip="The segmented image(s), cropped into the SEGS."),
                io.String.Input("classes", default="person",
                                tooltip="Classes to split into objects, separated by commas (any synonym, any case). "
                                        "Empty = every class but the background."),
                io.Int.Input("min_area", default=64, min=1, max=1 << 26,
                             tooltip="Smaller regions (in pixels at the image's size) are dropped."),
                io.Float.Input("crop_factor", default=3.0, min=1.0, max=100.0, step=0.1,
                               tooltip="Each SEG's crop region is its box grown this many times around its centre "
                                       "(context for a detailer), kept inside the image."),
                io.Int.Input("max_objects", default=256, min=1, max=4096, optional=True,
                             tooltip="At most this many objects per frame, the largest (a noisy map can hold "
                                     "thousands of specks, each a full-size mask); the log says how many were "
                                     "dropped."),
            ],
            outputs=[
                T.output(io.Mask, "masks", "One mask per object [objects, H, W] (one empty mask when there is none)."),
                T.output(T.SEGS, "segs",
                         "Impact-Pack's SEGS of the objects (crop of the image and of the mask, box, class name as "
                         "label, mean class probability as confidence), for its Detailer nodes. With a batch of "
                         "frames they hold the objects of every frame on one canvas (Impact's nodes would apply them "
                         "to every frame): for each frame's own SEGS, feed the frames one at a time (Image Batch to "
                         "Image List)."),
                T.output(io.String, "objects_json",
                         "The objects as JSON: frame, class, class_index, box [x1, y1, x2, y2) (ends exclusive), area "
                         "in pixels, confidence; in the masks' order."),
                T.output(io.Int, "count", "The number of objects."),
            ])

    @classmethod
    def execute(cls, segmentation: list, image: torch.Tensor, classes: str, min_area: int,
                crop_factor: float, max_objects: int = 256) -> io.NodeOutput:
        T.images(image)
        if image.shape[0] != len(T.items(segmentation, "segmentation")):
            raise ValueError(f"{image.shape[0]} image(s) for {len(segmentation)} segmentation(s): connect the "
                             "segmented image")
        size = tuple(image.shape[1:3])
        check_min_area(min_area)
        check_crop_factor(crop_factor)
        check_max_objects(max_objects)

        def one(b: int, seg: object, _progress: object) -> list[Instance]:
            if tuple(seg.image_size) != size:
                raise ValueError(f"the image is {size[1]}x{size[0]}, the segmentation {seg.image_size[1]}x"
                                 f"{seg.image_size[0]}: connect the segmented image")
            objects, dropped = find_largest_instances(seg.labels, object_classes(seg.classes, classes),
                                                      seg.classes.names, min_area, seg.probs, b, max_objects)
            if dropped:
                logging.warning("Trident Instances: frame %d: kept the %d largest of %d objects, dropped %d smaller "
                                "ones (raise max_objects to keep more)", b, max_objects, max_objects + dropped,
                                dropped)
            return objects

        objects = [o for frame in each_image(one, range(len(segmentation)), segmentation) for o in frame]
        dev = intermediate_device()
        masks = (torch.stack([torch.from_numpy(o.full_mask(size)) for o in objects]).float() if objects
                 else torch.zeros((1, *size)))
        segs = (size, [_seg(o, image, size, crop_factor) for o in objects])
        if len({o.frame for o in objects}) > 1:
            logging.warning("Trident Instances: the SEGS hold the objects of %d frames on one canvas; for each "
                            "frame's own SEGS, feed the frames one at a time (e.g. through Image Batch to Image "
                            "List)", image.shape[0])
        return io.NodeOutput(masks.to(dev), segs, json.dumps([o.as_dict() for o in objects]), len(objects))


NODES = (TridentInstances,)
