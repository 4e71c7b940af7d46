"""Input images: any common form to an RGB uint8 array, and the CLIP-branch rescaling of S0."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# The reference's data preprocessor: OpenAI CLIP's mean/std x 255, rounded.
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 64_000_000
FLOAT_PEAK = 2.0  # float images above this are taken for 0..255 ones (a little overshoot, e.g. from upscaling, is fine)
FLOAT_LOW = -0.5  # and below this for -1..1 ones
EXIF_ORIENTATION = 0x0112  # the EXIF tag: values 5..8 turn the image a quarter (width and height swap)


class ImageError(ValueError):
    """An input image that cannot be segmented."""


def to_rgb_uint8(image: object) -> np.ndarray:
    """HxWx3 uint8 RGB from a path, PIL image, numpy array or torch tensor (HxW, HxWxC; uint8, uint16 (16-bit:
    0..65535) or float 0..1; other integers 0..255).

    Gray images are repeated to three channels and an alpha channel is dropped. A batch must be split first."""
    sixteen = False  # 16-bit samples (a uint16 array, PIL's "I;16" modes, and its "I" holding values above 255)
    if image is None:
        raise ImageError("no image given (None): pass a file path, a PIL image, an array or a tensor")
    if isinstance(image, (str, bytes, os.PathLike)):
        image = read_image(os.fsdecode(image))
    elif hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        # 16-bit and float samples as their values (convert("RGB") clips them to 255: white, or black for 0..1)
        mode = image.mode
        image = np.asarray(image if mode.startswith("I") or mode == "F" else image.convert("RGB"))
        # "I" is 32-bit: 16-bit PNGs open so in older Pillow, an 8-bit image after convert("I") (divided by 257
        # it came out near black): its values tell which
        sixteen = mode.startswith("I;16") or (mode == "I" and image.size > 0 and int(image.max()) > 255)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.float()
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ImageError(f"got a batch of {arr.shape[0]} images; segment them one at a time")
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"expected an image of shape HxW or HxWxC (C = 1, 3 or 4), got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"the image is empty ({arr.shape[0]}x{arr.shape[1]})")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageError(f"the image has {arr.shape[0]}x{arr.shape[1]} pixels, more than {MAX_PIXELS // 10**6} "
                         "megapixels; downscale it first")
    if arr.dtype != np.uint8:
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ImageError(f"unsupported image dtype {arr.dtype}: give uint8 (0..255), uint16 (0..65535) or float "
                             "(0..1) samples" + (" (a mask: as uint8 0 and 255)" if arr.dtype == bool else ""))
        f = arr.astype(np.float32)  # (a copy of our own: the steps below work in it)
        low, peak = float(f.min(initial=0.0)), float(f.max(initial=0.0))
        if not (math.isfinite(low) and math.isfinite(peak)):  # (a NaN or an infinity anywhere is the min or max)
            raise ImageError("the image contains NaN or infinite values")
        if np.issubdtype(arr.dtype, np.floating):
            check_float_range(peak, low)
            np.multiply(f, 255.0, out=f)  # float images are 0..1 (ComfyUI's IMAGE)
        else:
            top = 65535 if sixteen or arr.dtype == np.uint16 else 255
            if low < 0 or peak > top:
                raise ImageError(f"integer pixel values go from {low:g} to {peak:g}: give 8-bit (0..255) or 16-bit "
                                 "(uint16, 0..65535) samples, or floats 0..1")
            if top == 65535:
                f = f / 257.0  # 16-bit to 8-bit (65535 -> 255), as OpenCV reads a 16-bit file
        arr = np.clip(np.rint(f, out=f), 0, 255, out=f).astype(np.uint8)
    c = arr.shape[2]
    if c in (1, 2):  # gray (+ alpha)
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif c == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def image_digest(image: np.ndarray) -> str:
    """A short digest of an RGB uint8 image's size and pixels: which image a stage's result was made from (another
    image of the same size gave results that mix two images without a word)."""
    h = hashlib.blake2b(repr(image.shape).encode(), digest_size=8)
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def require_same_image(image: np.ndarray, digest: str, what: str) -> None:
    """Refuse an image of the same size as, but other pixels than, the one a stage's result (`what`) was made from
    (`digest`: its `image_digest`; empty where unknown)."""
    if digest and image_digest(image) != digest:
        raise ImageError(f"the image is not the one the {what} was made from (another image of the same size): "
                         "connect the image that was segmented")


def check_float_range(peak: float, low: float = 0.0) -> None:
    """Refuse float pixel values far above 1 (a 0..255 image: clipped to 0..1 it would be nearly white) or far below
    0 (a -1..1 image: clipped, its darker half would be black)."""
    if peak > FLOAT_PEAK:
        raise ImageError(f"float pixel values go up to {peak:.4g}, but float images are 0..1 (ComfyUI's IMAGE): "
                         "divide by 255 first")
    if low < FLOAT_LOW:
        raise ImageError(f"float pixel values go down to {low:.4g}, but float images are 0..1 (ComfyUI's IMAGE): "
                         "a -1..1 image needs (x + 1) / 2 first")


def require_size(image: np.ndarray, size: tuple[int, int], what: str) -> None:
    """Refuse an image of another size than the one a stage's result (`what`) was made from."""
    if tuple(image.shape[:2]) != tuple(size):
        raise ImageError(f"the image is {image.shape[1]}x{image.shape[0]} pixels but the {what} was made from a "
                         f"{size[1]}x{size[0]} image: connect the image that was segmented")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8, decoded as the reference does (OpenCV, EXIF orientation applied); PIL (with the
    same orientation handling) for what OpenCV cannot read. A file that does not decode completely (cut short by
    an interrupted download or copy, which OpenCV's JPEG reader fills in with grey) is an ImageError."""
    if os.path.isdir(path) or not os.path.exists(path):  # (else named a damaged file by the checks below)
        raise ImageError(f"cannot read image {os.fspath(path)!r}: "
                         + ("it is a folder" if os.path.isdir(path) else "no such file"))
    if check_header(path) == "F":  # float samples, which OpenCV would cast unscaled
        return _float_samples(path)
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a broken file gets our one line only
    try:
        # OpenCV crashes on a file name that is not valid UTF-8 (undecodable bytes): PIL reads those
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR) if os.path.isfile(path) and _utf8(str(path)) else None
    finally:
        cv2.utils.logging.setLogLevel(level)
    check_complete(path)
    if bgr is not None:
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    from PIL import Image, ImageOps

    try:
        with _truncation_is_an_error(), Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: {e}") from e


def _float_samples(path: str | os.PathLike) -> np.ndarray:
    """A grey image of float samples (a float TIFF: PIL's mode "F") as RGB uint8, its values 0..1 (or, if any is
    above FLOAT_PEAK, 0..255: a little overshoot stays 0..1, as for float arrays) scaled to 0..255. OpenCV casts such
    samples to 8 bits unscaled, so a 0..1 image came out black, and NaN or infinite samples as 0 or 255: those are
    refused."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings(), _truncation_is_an_error():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                values = np.asarray(ImageOps.exif_transpose(im), dtype=np.float32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: {e}") from e
    if not np.isfinite(values).all():
        raise ImageError(f"cannot read image {os.fspath(path)!r}: some of its float samples are not numbers (NaN "
                         "or infinite); save it without them")
    scale = 255.0 if values.size and values.max() <= FLOAT_PEAK else 1.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


@contextmanager
def _truncation_is_an_error() -> Iterator[None]:
    """PIL's decoders raise on a file cut short, even where another package switched that off globally."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def check_complete(path: str | os.PathLike) -> None:
    """Refuse a file whose data ends early or fails its checksums, which OpenCV's JPEG reader fills in with grey and
    PIL's PNG decoder does not check: every PNG chunk's CRC, and a JPEG decoded at 1/8 scale (which reads every
    coefficient yet costs a fraction of a full decode) must reach its end. Other formats fail to decode when cut
    short."""
    from PIL import Image

    try:
        with warnings.catch_warnings(), _truncation_is_an_error():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.format == "PNG":
                    im.verify()
                elif im.format in ("JPEG", "MPO"):
                    im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                    im.load()
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: it does not decode completely (cut short or "
                         f"damaged, e.g. by an interrupted download or copy): {e}") from e


def check_header(path: str | os.PathLike) -> str | None:
    """Refuse, from its first bytes, a file that is no image either decoder knows, and an image whose header
    declares more than MAX_PIXELS (a small file can declare a huge image, which OpenCV would decode whole first),
    before anything reads the whole file."""
    from PIL import Image

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: the file is empty (0 bytes), as an interrupted "
                         "copy or download leaves it: copy it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (size warnings, odd EXIF: the decoders' turn comes next)
            with Image.open(path) as im:
                (w, h), mode = im.size, im.mode
    except Image.DecompressionBombError:
        w = h = mode = None
    except Image.UnidentifiedImageError as e:  # (formats only OpenCV knows, e.g. Radiance HDR, declare sizes
        # nothing checks before OpenCV decodes them whole)
        from .video_io import VIDEO_EXTENSIONS

        raise ImageError(f"cannot read image {os.fspath(path)!r}: not an image format Trident reads (PNG, JPEG, "
                         f"WebP, BMP, TIFF, GIF, PPM/PGM; video clips: {' '.join(VIDEO_EXTENSIONS)}, one per "
                         "command)") from e
    except (OSError, ValueError, SyntaxError):  # broken: the decoders will say
        return None
    if w is None or w * h > MAX_PIXELS:
        size = "far more" if w is None else f"{w}x{h} pixels, more"
        raise ImageError(f"{os.fspath(path)} declares {size} than {MAX_PIXELS // 10**6} megapixels; downscale it "
                         "first")
    return mode


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """An image file's (H, W) as it decodes (EXIF orientation applied), from its header alone, after
    `check_header`'s checks; None where PIL cannot read the header (decoding the file then says why)."""
    check_header(path)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                if im.format == "TIFF" and {256, 257} <= set(im.tag_v2):  # (PIL gives a turned TIFF's size turned)
                    w, h = im.tag_v2[256], im.tag_v2[257]
                # (a PNG without an EXIF chunk before its pixels: getexif() would decode the whole image)
                exif = im.getexif() if im.format != "PNG" or "exif" in im.info else {}
                turned = exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (w, h) if turned else (h, w)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def rescale_short_side(img: np.ndarray, short_side: int, long_cap: int = 2048) -> np.ndarray:
    """S0's first resize (mmcv keep-ratio Resize): factor min(cap/long, short/short), sizes int(x*k+0.5), uint8."""
    h, w = img.shape[:2]
    k = min(long_cap / max(h, w), short_side / min(h, w))
    nw, nh = max(1, int(w * float(k) + 0.5)), max(1, int(h * float(k) + 0.5))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)


def normalize_clip(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 3, H, W] float32 CLIP-normalised as the reference's data preprocessor does (0..255 scale), computed on
    `device` (the uint8 pixels copied there: a GPU host spent 5 ms a frame on this; the same values anywhere)."""
    x = torch.from_numpy(img).to(device).permute(2, 0, 1).float()
    mean, std = (device_constant(c, torch.device(device)).view(3, 1, 1) for c in (CLIP_MEAN_255, CLIP_STD_255))
    return ((x - mean) / std)[None]


@functools.cache
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`values` as a float32 tensor on `device`, made once per device and never changed (made per call, each was
    a blocking copy to a GPU)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def fit_to_patches(x: torch.Tensor, patch: int, window: int) -> torch.Tensor:
    """S0's second resize: both sides to multiples of the patch size and at least the window size.

    The long side is rounded up, each side scaled by it and truncated, then rounded up (the reference's
    preprocess_image). Deviation: an image already on the patch grid but smaller than the window is upscaled
    too (the reference crashes or pads there)."""
    h, w = x.shape[-2:]
    if h % patch == 0 and w % patch == 0 and min(h, w) >= window:
        return x
    long = max(h, w)
    dst_long = math.ceil(long / patch) * patch
    nh, nw = int(h * dst_long / long), int(w * dst_long / long)
    nh, nw = math.ceil(nh / patch) * patch, math.ceil(nw / patch) * patch
    nh, nw = max(nh, window), max(nw, window)
    return F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False)


def clip_input(img: np.ndarray, short_side: int, patch: int, window: int, long_cap: int = 2048,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The CLIP/DINO branch's image: rescaled, CLIP-normalised, on the patch grid. [1, 3, H', W'] float32 on
    `device`."""
    return fit_to_patches(normalize_clip(rescale_short_side(img, short_side, long_cap), device), patch, window)


def round_up_to(img: np.ndarray, multiple: int) -> np.ndarray:
    """The SAM branch's image: sides rounded up to a multiple (cv2 INTER_LINEAR on uint8), as the reference."""
    h, w = img.shape[:2]
    nh, nw = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    if (nh, nw) == (h, w):
        return img
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
