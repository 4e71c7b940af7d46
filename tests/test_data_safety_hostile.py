"""`segment` attacked as a hostile user would, after the first data-safety work: a planted trident.json, links at
our temporary names or in place of masks/, pipes where caches go, non-UTF-8 and non-ASCII names, crafted npz and
eval states, formats only OpenCV knows. Each test names the finding (F<n>) of that review it guards against."""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trident_core.cli import main

CLASSES = "sky, tree"


def _models(ckpts) -> list[str]:
    return ["--clip", str(ckpts["clip"]), "--dino", str(ckpts["dino"]), "--sam", str(ckpts["sam"]), "--device",
            "cpu", "--no-download", "--no-refine", "--short-side", "64"]


def _seg(ckpts, *args, classes: str = CLASSES) -> int:
    return main(["segment", *map(str, args), *_models(ckpts), "--classes", classes])


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TRIDENT_CACHE", str(folder))
    return folder


def _returns_within(fn, seconds: float, unblock: Path) -> bool:
    """Whether fn() returns within `seconds` (a reader blocked on the FIFO `unblock` is released afterwards)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung:  # open the FIFO's other end so the blocked reader ends
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
    return not hung


# F1 ------------------------------------------------------------------------------------------------------------
def test_f1_a_trident_json_we_did_not_write_does_not_make_a_users_files_ours(small_ckpts, tmp_path, cache):
    """F1: any file named trident.json ("{}", text, a truncated one) makes every file with one of our names
    replaceable ('a damaged marker: ours'), and the user's trident.json itself is replaced."""
    img = _image(tmp_path / "a.png")
    for n, content in enumerate(["{}", "notes of another tool", '{"key": "x"}']):
        out = tmp_path / f"mine{n}"
        (out / "masks").mkdir(parents=True)
        mine = {"trident.json": content.encode(), "overlay.png": b"MY OVERLAY", "masks/000_sky.png": b"MY SKY"}
        for rel, data in mine.items():
            (out / rel).write_bytes(data)
        _seg(small_ckpts, img, "--out", out)
        assert {rel: (out / rel).read_bytes() for rel in mine} == mine, content


# F2 ------------------------------------------------------------------------------------------------------------
def test_f2_a_users_file_with_partial_in_its_name_survives_a_rerun(small_ckpts, tmp_path, cache):
    """F2: outputs._files skips every name containing '.partial-', so a folder holding such a user file counts
    as 'all ours' and is replaced whole (the file deleted)."""
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert _seg(small_ckpts, tmp_path / "in", "--out", out) == 0
    mine = out / "a.png" / "report.partial-draft.txt"
    mine.write_bytes(b"MY REPORT")
    _seg(small_ckpts, tmp_path / "in", "--out", out, "--overwrite")
    assert mine.is_file() and mine.read_bytes() == b"MY REPORT"


# F3 ------------------------------------------------------------------------------------------------------------
def test_f3_non_ascii_class_names_resume_and_clean_up(small_ckpts, tmp_path, cache, capsys):
    """F3: file_part keeps non-ASCII letters (str.isalnum) but marker._NUMBERED_PNG is ASCII-only: the marker of
    a run with 'café' is read back as damaged, so resume never skips and stale masks are never removed."""
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert _seg(small_ckpts, tmp_path / "in", "--out", out, classes="café, tree") == 0
    capsys.readouterr()
    assert _seg(small_ckpts, tmp_path / "in", "--out", out, classes="café, tree") == 0
    assert "1 already complete" in capsys.readouterr().err
    assert _seg(small_ckpts, tmp_path / "in", "--out", out, classes="sky, grass") == 0
    assert sorted(p.name for p in (out / "a.png" / "masks").iterdir()) == ["000_sky.png", "001_grass.png"]


# F4 ------------------------------------------------------------------------------------------------------------
def test_f4_a_fifo_named_like_a_marker_or_cache_does_not_hang(tmp_path):
    """F4: jsonfile.read opens the path without checking it is a regular file: a FIFO at trident.json,
    file-hashes.json or the kernel timings blocks the run forever."""
    from trident_core.file_digest import _read_memo
    from trident_core.kernels import timing
    from trident_core.marker import read_marker

    (tmp_path / "o").mkdir()
    fifo = tmp_path / "o" / "trident.json"
    os.mkfifo(fifo)
    assert _returns_within(lambda: read_marker(tmp_path / "o"), 5, fifo), "read_marker hangs on a FIFO"
    memo = tmp_path / "file-hashes.json"
    os.mkfifo(memo)
    assert _returns_within(lambda: _read_memo(memo), 5, memo), "the digest memo hangs on a FIFO"
    timings = tmp_path / "timings.json"
    os.mkfifo(timings)
    assert _returns_within(lambda: timing._read(timings), 5, timings), "the kernel timings hang on a FIFO"


# F5 ------------------------------------------------------------------------------------------------------------
def test_f5_a_planted_link_at_our_temporary_name_is_not_written_through(small_ckpts, tmp_path, cache):
    """F5: atomic_file opens its temporary name with open(..., 'wb'), which follows a symbolic link planted there
    (pids are guessable): the marker is written into the link's target."""
    img = _image(tmp_path / "a.png")
    out = tmp_path / "shared"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"PRECIOUS")
    (out / f".trident.json.partial-{os.getpid()}").symlink_to(victim)
    _seg(small_ckpts, img, "--out", out)
    assert victim.read_bytes() == b"PRECIOUS"


# F6 ------------------------------------------------------------------------------------------------------------
def test_f6_files_behind_a_linked_masks_folder_are_not_replaced_or_deleted(small_ckpts, tmp_path, cache):
    """F6: a marker lists masks/000_sky.png; when masks/ is a link to another folder (no marker there), the files
    of that folder are replaced, then deleted when the classes change."""
    img = _image(tmp_path / "a.png")
    out = tmp_path / "o"
    assert _seg(small_ckpts, img, "--out", out) == 0
    user = tmp_path / "userpics"
    user.mkdir()
    (user / "000_sky.png").write_bytes(b"USER SKY")
    for p in (out / "masks").iterdir():
        p.unlink()
    (out / "masks").rmdir()
    (out / "masks").symlink_to(user, target_is_directory=True)
    _seg(small_ckpts, img, "--out", out, "--overwrite")
    _seg(small_ckpts, img, "--out", out, "--overwrite", classes="dog, cat")
    assert (user / "000_sky.png").is_file() and (user / "000_sky.png").read_bytes() == b"USER SKY"


# F7 ------------------------------------------------------------------------------------------------------------
def test_f7_a_png_with_a_damaged_idat_is_unreadable(tmp_path):
    """F7: OpenCV refuses a PNG whose IDAT fails its CRC; the PIL fallback decodes it (garbage) without checking."""
    from trident_core.image import ImageError, to_rgb_uint8

    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3).astype(np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)  # a zeroed run (bad sector, failed copy)
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        to_rgb_uint8(path)


# F8 ------------------------------------------------------------------------------------------------------------
def test_f8_an_image_with_a_non_utf8_name_is_skipped_not_fatal(small_ckpts, tmp_path, cache, capsys):
    """F8: atomic._stem encodes the name as strict UTF-8: an image named with undecodable bytes ends the whole
    folder run (exit 2, 'surrogates not allowed') after the images before it; the ones after it are never done."""
    root = tmp_path / "in"
    _image(root / "a.png")
    _image(Path(os.fsdecode(os.fsencode(root) + b"/b\xff.png")), 1)
    _image(root / "c.png", 2)
    rc = _seg(small_ckpts, root, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc in (0, 3) and "surrogates" not in err, err
    assert (tmp_path / "out" / "c.png" / "trident.json").is_file()


# F9 ------------------------------------------------------------------------------------------------------------
def test_f9_a_cache_folder_that_cannot_be_looked_into_is_a_miss(small_ckpts, tmp_path, monkeypatch):
    """F9: text_cache.load calls Path.is_file, which raises for EACCES/ENAMETOOLONG (Python 3.11): a cache folder
    that cannot be entered (another user's, mode 700) or whose name is too long stops the run (exit 2)."""
    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path / ("x" * 300)))
    assert _seg(small_ckpts, _image(tmp_path / "a.png"), "--out", tmp_path / "out") == 0


# F10 -----------------------------------------------------------------------------------------------------------
def test_f10_a_small_npz_does_not_take_gigabytes_to_check(tmp_path):
    """F10: _npz_run_key reads the whole run_key member: a 0.3 MB compressed npz holding a 256 MB run_key costs
    256 MB (a 20 MB one: 20 GB) in check_destinations / resume."""
    from trident_core.outputs import _replaceable_npz

    path = tmp_path / "a.png.npz"
    np.savez_compressed(path, run_key=np.zeros(256 << 20, np.uint8))
    tracemalloc.start()
    try:
        _replaceable_npz(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MB to check a {path.stat().st_size >> 10} KB file"


# F11 -----------------------------------------------------------------------------------------------------------
def test_f11_an_image_only_opencv_knows_is_size_checked_before_decoding(tmp_path, monkeypatch):
    """F11: check_header returns without a size check for files PIL cannot identify (Radiance .hdr, PFM, EXR...),
    so OpenCV decodes them whole: a 9 MB .hdr (here named .png) declaring 144 MP costs ~2 GB before refusal."""
    import trident_core.image as image

    w = h = 12000
    run = bytes([2, 2, w >> 8, w & 255]) + b"".join(
        bytes([128 + 127, v]) * (w // 127) + bytes([128 + w % 127, v]) for v in (128, 64, 32, 129))
    path = tmp_path / "sneaky.png"
    path.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (h, w) + run * 4)  # (size: the header)

    def no_decode(*_args, **_kw):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(image.cv2, "imread", no_decode)
    with pytest.raises(image.ImageError):
        image.to_rgb_uint8(path)


# F12 -----------------------------------------------------------------------------------------------------------
def test_f12_save_npz_onto_an_output_name_is_refused(small_ckpts, tmp_path, cache):
    """F12: --save-npz OUT/trident.json with --out OUT exits 0, but the npz is overwritten by the marker (and the
    next run says Trident did not write it)."""
    img = _image(tmp_path / "a.png")
    out = tmp_path / "o"
    rc = _seg(small_ckpts, img, "--out", out, "--save-npz", out / "trident.json")
    assert rc == 2 or (out / "trident.json").read_bytes()[:4] == b"PK\x03\x04"  # the npz asked for


# F13 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["done_strings", "predict_s_array", "config_list", "config_number",
                                      "done_2d", "negative_confusion"])
def test_f13_a_crafted_eval_resume_state_is_refused_in_one_line(tmp_path, override):
    """F13: _State.load validates little: odd member types raise TypeError/AttributeError (a traceback from the
    CLI, which catches ValueError/OSError/RuntimeError), a negative confusion is taken as valid."""
    from trident_core.evaluation.datasets import Sample
    from trident_core.evaluation.runner import evaluate

    samples = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), i * 50, np.uint8)).save(p)
        samples.append(Sample(p, np.full((4, 4), i % 2, np.uint8), str(i)))

    def pred(im):
        return np.zeros(im.shape[:2], np.int64)

    out = tmp_path / "r.json"
    evaluate(pred, samples, 2, result_json=out, progress=False, config={"a": 1})
    state = tmp_path / "r.json.state-rank0of1.npz"
    good = dict(np.load(state))
    meta = json.loads(str(good["meta"]))
    bad = {"done_strings": {"done": np.array(["a", "b"])}, "predict_s_array": {"predict_s": np.array([1.0, 2.0])},
           "config_list": {"meta": np.array(json.dumps({**meta, "config": "[1]"}))},
           "config_number": {"meta": np.array(json.dumps({**meta, "config": 5}))},
           "done_2d": {"done": np.array([[0, 1, 2]])}, "negative_confusion": {"confusion": -good["confusion"]}}
    np.savez(state, **{**good, **bad[override]})
    try:
        result = evaluate(pred, samples, 2, result_json=out, progress=False, config={"a": 1})
    except (ValueError, OSError, RuntimeError):
        return  # refused in one line (or started over): fine
    assert min(min(row) for row in result["confusion_matrix"]) >= 0


# F14 -----------------------------------------------------------------------------------------------------------
def test_f14_eval_no_resume_deletes_only_state_files_it_wrote(tmp_path):
    """F14: _State._others globs '<stem>.state-rank*of*.npz' and --no-resume deletes every match, e.g. a user's
    'r.state-rankings-of-2024.npz' (not even an npz)."""
    from trident_core.evaluation.datasets import Sample
    from trident_core.evaluation.runner import evaluate

    p = tmp_path / "0.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    mine = tmp_path / "r.json.state-rankings-of-2024.npz"
    mine.write_bytes(b"MY DATA")
    evaluate(lambda im: np.zeros(im.shape[:2], np.int64), [Sample(p, np.zeros((4, 4), np.uint8), "0")], 2,
             result_json=tmp_path / "r.json", progress=False, resume=False)
    assert mine.is_file() and mine.read_bytes() == b"MY DATA"


# F15 -----------------------------------------------------------------------------------------------------------
def test_f15_a_listed_pattern_reaching_up_a_folder_works(small_ckpts, tmp_path, cache):
    """F15: '../imgs/*.png' in an @list ends with Python's 'is not in the subpath of ...' (the images' names are
    taken relative to the list's folder, which does not hold them); the same files listed one by one work."""
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", 1)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("../imgs/*.png\n")
    assert _seg(small_ckpts, "@" + str(tmp_path / "lists" / "l.txt"), "--out", tmp_path / "out") == 0
