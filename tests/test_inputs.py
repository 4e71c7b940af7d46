"""Bad and unusual input: a clear error or a correct result, never a traceback from deep inside torch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from trident_core import ClassListError, parse_classes
from trident_core.checkpoints import CheckpointError
from trident_core.image import ImageError, to_rgb_uint8
from trident_core.models import load_clip, load_dino, load_sam


def test_class_list_parsing():
    cl = parse_classes("sky, horse; pony , grass")
    assert cl.classes == (("sky",), ("horse", "pony"), ("grass",)) and not cl.has_background
    assert cl.queries == ["sky", "horse", "pony", "grass"] and cl.query_class == [0, 1, 1, 2]
    assert parse_classes("a; b\nc\n").classes == (("a", "b"), ("c",))
    bg = parse_classes("cat, dog", background="sky; wall")
    assert bg.has_background and bg.names == ["sky", "cat", "dog"]


@pytest.mark.parametrize("text,match", [("", "no class names"), (" , ;, ", "no class names"),
                                        ("cat, dog, Cat", "appears in classes 1 and 3"),
                                        ("horse; horse", "twice in one class")])
def test_bad_class_lists(text, match):
    with pytest.raises(ClassListError, match=match):
        parse_classes(text)


def test_overlong_class_name(small_trident):
    with pytest.raises(ClassListError, match="too long"):
        small_trident.text(parse_classes("word " * 80 + ", sky"))


@pytest.mark.parametrize("shape,dtype", [((1, 1, 3), np.uint8), ((17, 23), np.uint8), ((20, 30, 4), np.uint8),
                                         ((20, 30, 1), np.float32), ((1, 20, 30, 3), np.float32)])
def test_image_forms(shape, dtype):
    arr = (np.random.default_rng(0).random(shape) * (255 if dtype == np.uint8 else 1)).astype(dtype)
    img = to_rgb_uint8(arr)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if dtype == np.float32:
        assert img.max() > 200 or arr.max() < 0.8  # float input is read as 0..1


def test_bad_images():
    with pytest.raises(ImageError, match="NaN"):
        to_rgb_uint8(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(ImageError, match="batch of 2"):
        to_rgb_uint8(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        to_rgb_uint8(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ImageError, match="empty"):
        to_rgb_uint8(np.zeros((0, 8, 3), np.uint8))


@pytest.mark.parametrize("size", [(1, 1), (17, 23), (300, 4000), (4000, 300)])
def test_tiny_and_extreme_images_segment(small_trident, size):
    from trident_core import Params

    img = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    seg = small_trident.segment(img, "sky, horse, grass", Params().update(refine=True, iou_thresh=0.0, minimal_area=1))
    assert tuple(seg.labels.shape) == size and tuple(seg.probs.shape) == (3, *size)
    assert torch.isfinite(seg.probs).all() and torch.isfinite(seg.grid_logits).all()


def test_gray_and_rgba_images_segment(small_trident, photo):
    gray = photo.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=2)
    a = small_trident.segment(gray, "sky, person")
    b = small_trident.segment(np.repeat(gray[:, :, None], 3, axis=2), "sky, person")
    assert torch.equal(a.labels, b.labels)
    c = small_trident.segment(rgba, "sky, person")
    d = small_trident.segment(photo, "sky, person")
    assert torch.equal(c.labels, d.labels)


def test_wrong_model_checkpoint(small_ckpts):
    with pytest.raises(CheckpointError, match="is not an open_clip CLIP checkpoint.*Segment Anything"):
        load_clip(small_ckpts["sam"])
    with pytest.raises(CheckpointError, match="is not a DINO ViT checkpoint.*CLIP"):
        load_dino(small_ckpts["clip"])
    with pytest.raises(CheckpointError, match="is not a Segment Anything checkpoint.*DINO"):
        load_sam(small_ckpts["dino"])


def test_truncated_and_empty_checkpoints(small_ckpts, tmp_path):
    data = small_ckpts["sam"].read_bytes()
    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_sam(bad)
    st = tmp_path / "clip.safetensors"
    st.write_bytes(small_ckpts["clip"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_clip(st)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_dino(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_dino(tmp_path / "nope.pth")


class Exploit:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Exploit()}, f)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_dino(path)
    path2 = tmp_path / "evil2.pth"
    torch.save({"cls_token": torch.zeros(1), "extra": Exploit()}, path2)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_dino(path2)


def test_checkpoint_formats_load_identically(small_ckpts):
    a, b = load_clip(small_ckpts["clip"]), load_clip(small_ckpts["clip_bin"])
    assert a.quick_gelu is False or a.arch.startswith("ViT-w")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_image_files_are_read_like_the_reference(tmp_path, photo):
    """OpenCV decoding with the EXIF orientation applied (a phone photo stored sideways comes out upright)."""
    import cv2
    from PIL import Image

    img = Image.fromarray(photo[:100, :200])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    got = to_rgb_uint8(tmp_path / "phone.jpg")
    ref = cv2.cvtColor(cv2.imread(str(tmp_path / "phone.jpg"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert got.shape == (200, 100, 3) and np.array_equal(got, ref)
    with pytest.raises(ImageError, match="cannot read image"):
        to_rgb_uint8(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image"):
        to_rgb_uint8(tmp_path / "bad.png")


def test_16_bit_and_float_images_given_as_objects_read_as_their_files_do(tmp_path):
    """A 16-bit PNG opened by PIL (mode I;16) or OpenCV (uint16), or a float image as a PIL object (mode F), came
    out white or black (clipped at 255); other integers beyond 0..255 and complex values are refused."""
    import cv2
    from PIL import Image

    from trident_core.image import ImageError, to_rgb_uint8

    ramp = np.linspace(0, 65535, 24, dtype=np.float64).round().astype(np.uint16).reshape(4, 6)
    cv2.imwrite(str(tmp_path / "g16.png"), ramp)
    from_file = to_rgb_uint8(tmp_path / "g16.png")
    want = np.rint(ramp / 257.0).astype(np.uint8)  # independent: 65535 -> 255 linearly
    assert np.abs(from_file[..., 0].astype(int) - want).max() <= 1
    for obj in (Image.open(tmp_path / "g16.png"), cv2.imread(str(tmp_path / "g16.png"), cv2.IMREAD_UNCHANGED), ramp,
                torch.from_numpy(ramp.astype(np.int32))[..., None].expand(4, 6, 3)):
        got = to_rgb_uint8(obj) if not isinstance(obj, torch.Tensor) else to_rgb_uint8(obj.numpy().astype(np.uint16))
        assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    values = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    assert np.array_equal(to_rgb_uint8(Image.fromarray(values))[..., 1], np.rint(values * 255).astype(np.uint8))
    for bad in (np.full((4, 4), 300, np.int32), np.full((4, 4), -5, np.int16), np.full((4, 4), 0.5 + 0j)):
        with pytest.raises(ImageError):
            to_rgb_uint8(bad)


def test_wide_pil_modes_and_float_files_read_by_their_values(tmp_path):
    """From a review of the library: PIL's 32-bit "I" mode was always taken for 16-bit, so an 8-bit picture after
    convert("I") came out near black; a float TIFF with one sample at 1.05 was read as 0..255 (near black) where
    the same samples as an array are 0..1; a missing file or a folder was called a damaged file."""
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (12, 18), dtype=np.uint8)
    want = np.repeat(grey[:, :, None], 3, axis=2)
    for obj in (Image.fromarray(grey).convert("I"), Image.fromarray(grey.astype(np.int32))):
        assert obj.mode == "I" and np.array_equal(to_rgb_uint8(obj), want)
    wide = (grey.astype(np.int32) * 257)  # the same picture in 16-bit samples, held by a 32-bit "I" image
    assert np.array_equal(to_rgb_uint8(Image.fromarray(wide)), want)
    values = grey.astype(np.float32) / 255
    values[0, 0] = 1.05  # a little overshoot (an upscaler's)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    got = to_rgb_uint8(tmp_path / "f.tif")
    assert np.array_equal(got, to_rgb_uint8(values)) and got[..., 0].mean() > 100
    with pytest.raises(ImageError, match="no such file"):
        to_rgb_uint8(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="it is a folder"):
        to_rgb_uint8(tmp_path)


def test_no_image_a_bytes_path_and_a_boolean_mask_are_answered_plainly(tmp_path):
    """None got "expected an image of shape HxW or HxWxC ..., got ()", a path as bytes the same, and a boolean
    array "unsupported image dtype bool" without saying what to pass."""
    from PIL import Image

    with pytest.raises(ImageError, match=r"no image given \(None\)"):
        to_rgb_uint8(None)
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(to_rgb_uint8(bytes(tmp_path / "a.png")), rgb)
    with pytest.raises(ImageError, match=r"dtype bool: give uint8 .* \(a mask: as uint8 0 and 255\)"):
        to_rgb_uint8(np.zeros((4, 4), bool))
