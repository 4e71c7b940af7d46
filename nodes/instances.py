"""Trident Instances: the chosen classes split into objects, as masks, boxes and Impact-Pack's SEGS; on a batch of
frames also the objects tracked over the clip (trident_core.tracking), in the forms video workflows take."""

from __future__ import annotations

import json
import logging
from collections import namedtuple

import torch

from ..trident_core.classes import named_classes
from ..trident_core.flow import FlowStream
from ..trident_core.image import to_rgb_uint8
from ..trident_core.instances import (
    MAX_OBJECTS,
    MIN_AREA,
    Instance,
    check_crop_factor,
    check_max_objects,
    check_min_area,
    crop_region,
    find_largest_instances,
    mask_stack,
)
from ..trident_core.render import render_tracks
from ..trident_core.tracking import DEFAULT_MAX_GAP, MAX_GAP_LIMIT, ObjectTracker, check_max_gap
from ..trident_core.tracks import Track, TrackedObjects, paste
from . import sockets as T
from .comfy_bridge import each_image, intermediate_device, io

# Impact-Pack's SEG (impact/core.py), rebuilt so the pack loads without Impact-Pack; its nodes read the fields by
# name. SEGS = ((H, W), [SEG, ...]).
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])


def _seg(obj: Instance, image: torch.Tensor, size: tuple[int, int], crop_factor: float) -> SEG:
    """An object as a SEG: the frame (as ComfyUI's IMAGE: 3 channels, float32 0..1, a copy: a detailer may paint
    on it) and the object's mask (float32 numpy, as Impact-Pack keeps it) cut to the crop region."""
    x1, y1, x2, y2 = region = crop_region(obj.box, size, crop_factor)
    mask = paste(region, obj.box, obj.mask.astype("float32"))
    crop = image[obj.frame, y1:y2, x1:x2, :]
    if crop.is_floating_point():
        crop = crop[..., :3] if crop.shape[-1] >= 3 else crop[..., :1].expand(*crop.shape[:-1], 3)  # alpha, gray
        crop = crop.to(torch.float32, copy=True)
    else:  # (integer samples: 0..255, or 0..65535 for 16-bit, as every Trident node reads them)
        crop = torch.from_numpy(to_rgb_uint8(crop)).float() / 255
    return SEG(crop.unsqueeze(0).contiguous(), mask, obj.confidence, list(region), obj.box, obj.class_name, None)


def _video_seg(track: Track, num_frames: int, size: tuple[int, int], crop_factor: float) -> SEG:
    """A tracked object as Impact-Pack's video SEG: one crop region for the clip (the union of its boxes grown
    `crop_factor` times, inside the image), its mask in every frame cut to it (float32 tensor [frames, h, w], zeros
    where it is absent, as Impact's own video detectors give it), no image crop (its video nodes cut the frames)."""
    x1, y1, x2, y2 = region = track.crop_region(size, crop_factor)
    mask = torch.zeros((num_frames, y2 - y1, x2 - x1), dtype=torch.float32)
    track.write_masks(mask.numpy(), region)
    return SEG(None, mask, track.confidence, list(region), track.box(), track.class_name, None)


def _preview(image: torch.Tensor, objects: TrackedObjects) -> torch.Tensor:
    """The frames with each tracked object in its id's colour and its id written on it (IMAGE [frames, H, W, 3])."""
    out = torch.empty((image.shape[0], *image.shape[1:3], 3), dtype=torch.float32)
    for k in range(image.shape[0]):
        out[k] = torch.from_numpy(render_tracks(to_rgb_uint8(image[k]), objects.frame_objects(k))).float() / 255
    return out


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
                io.Int.Input("min_area", default=MIN_AREA, min=1, max=1 << 26,
                             tooltip="Smaller regions (in pixels at the image's size) are dropped."),
                io.Float.Input("crop_factor", default=3.0, min=1.0, max=100.0, step=0.1,
                               tooltip="Each SEG's crop region is its box grown this many times around its centre "
                                       "(context for a detailer), kept inside the image."),
                io.Int.Input("max_objects", default=MAX_OBJECTS, min=1, max=4096, optional=True,
                             tooltip="At most this many objects per frame in masks, segs and objects_json, the "
                                     "largest (a noisy map can hold thousands of specks, each a full-size mask); "
                                     "and at most this many tracked objects over the clip in the tracked outputs, "
                                     "those covering the most pixels over all frames (their ids kept). The log "
                                     "says how many were dropped."),
                io.Boolean.Input("track_objects", default=True, optional=True,
                                 tooltip="On (default): the objects are followed from frame to frame (optical flow "
                                         "between the frames), each keeping one id while in view and again after "
                                         "an absence of up to max_gap frames: the tracked outputs. A single image "
                                         "gives its objects as they are, so it behaves as before. masks, segs, "
                                         "objects_json and count are per frame either way. Off: no tracking, the "
                                         "tracked outputs hold one empty object."),
                io.Int.Input("max_gap", default=DEFAULT_MAX_GAP, min=0, max=MAX_GAP_LIMIT, optional=True,
                             tooltip="Tracking: an object missing for up to this many frames in a row (hidden, "
                                     "out of view) keeps its id when it comes back; a longer absence gives it a "
                                     "new id."),
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
                T.output(io.Mask, "object_masks",
                         "Tracked: one MASK [frames, H, W] per object (zeros where it is absent), as a list (the "
                         "nodes it feeds run once per object, e.g. one mask video each); one empty mask when there "
                         "is no object.", is_list=True),
                T.output(io.Mask, "mask_batch",
                         "Tracked: every object's masks in one batch [objects x frames, H, W], object by object "
                         "(frame k of object i at i x frames + k: the order of Impact-Pack's SEGS to Mask Batch)."),
                T.output(T.SEGS, "video_segs",
                         "Tracked: Impact-Pack's SEGS in its video form, one SEG per object: its mask in every "
                         "frame [frames, h, w] over one crop region for the clip (the union of its boxes grown by "
                         "crop_factor), no image crop, the class name as label. For SEGS Detailer For AnimateDiff, "
                         "SEGSPaste, SEGS to Mask Batch with the frames."),
                T.output(io.String, "tracks_json",
                         "Tracked: the objects as JSON: id, class, class_index, first and last frame, confidence "
                         "and per frame seen its box [x1, y1, x2, y2) (ends exclusive), area and confidence."),
                T.output(io.Image, "tracked_preview",
                         "The frames with each tracked object in its own colour and its id written on it (the same "
                         "colour in every frame)."),
            ])

    @classmethod
    def execute(cls, segmentation: list, image: torch.Tensor, classes: str, min_area: int,
                crop_factor: float, max_objects: int = MAX_OBJECTS, track_objects: bool = True,
                max_gap: int = DEFAULT_MAX_GAP) -> io.NodeOutput:
        T.images(image)
        if image.shape[0] != len(T.items(segmentation, "segmentation")):
            raise ValueError(f"{image.shape[0]} image(s) for {len(segmentation)} segmentation(s): connect the "
                             "segmented image")
        size = tuple(image.shape[1:3])
        check_min_area(min_area)
        check_crop_factor(crop_factor)
        check_max_objects(max_objects)
        check_max_gap(max_gap)
        wanted = named_classes(segmentation[0].classes, classes)
        tracker = ObjectTracker(wanted, segmentation[0].classes.names, min_area, max_gap) if track_objects else None
        flows = FlowStream()
        cut: list[int] = []  # per frame that had more than max_objects objects: how many were dropped

        def one(b: int, seg: object, _progress: object) -> list[Instance]:
            if tuple(seg.image_size) != size:
                raise ValueError(f"the image is {size[1]}x{size[0]}, the segmentation {seg.image_size[1]}x"
                                 f"{seg.image_size[0]}: connect the segmented image")
            probs = seg.probs
            objects, dropped = find_largest_instances(seg.labels, named_classes(seg.classes, classes),
                                                      seg.classes.names, min_area, probs, b, max_objects)
            if dropped:
                cut.append(dropped)
            if tracker is not None:
                if list(seg.classes.names) != tracker.class_names:
                    raise ValueError(f"frame {b} was segmented with other classes than frame 0: connect one "
                                     "segmentation of the clip")
                frame = to_rgb_uint8(image[b])
                tracker.push(seg.labels, probs, flows.push(frame), frame)
            return objects

        objects = [o for frame in each_image(one, range(len(segmentation)), segmentation) for o in frame]
        if cut:  # one line for the clip, not one per frame
            logging.warning("Trident Instances: kept the %d largest objects of each frame, dropped %d smaller ones in "
                            "%d of %d frame(s) (raise max_objects to keep more)", max_objects, sum(cut), len(cut),
                            len(segmentation))
        dev = intermediate_device()
        masks = mask_stack(objects, size)
        segs = (size, [_seg(o, image, size, crop_factor) for o in objects])
        if len({o.frame for o in objects}) > 1:
            logging.warning("Trident Instances: the SEGS hold the objects of %d frames on one canvas; for each "
                            "object over the clip, take video_segs", image.shape[0])
        tracked = TrackedObjects((), image.shape[0], size) if tracker is None else tracker.result()
        tracked, dropped = tracked.largest(max_objects)
        if dropped:
            logging.warning("Trident Instances: kept the %d tracked objects covering the most pixels, dropped %d "
                            "(raise max_objects to keep more)", max_objects, dropped)
        return io.NodeOutput(masks.to(dev), segs, json.dumps([o.as_dict() for o in objects]), len(objects),
                             *cls._tracked(tracked, image, crop_factor, dev))

    @staticmethod
    def _tracked(tracked: TrackedObjects, image: torch.Tensor, crop_factor: float, dev: torch.device) -> tuple:
        """The tracked outputs: per-object masks (views of the batch), the batch, video SEGS, JSON, preview."""
        n, size = tracked.num_frames, tracked.size
        batch = tracked.mask_batch() if tracked.tracks else torch.zeros((n, *size))
        batch = batch.to(dev)
        per_object = [batch[i:i + n] for i in range(0, batch.shape[0], n)]
        video_segs = (size, [_video_seg(t, n, size, crop_factor) for t in tracked.tracks])
        return per_object, batch, video_segs, tracked.to_json(), _preview(image, tracked).to(dev)


NODES = (TridentInstances,)
