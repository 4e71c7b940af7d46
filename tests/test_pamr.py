"""PAMR: equal to a direct pixel-by-pixel formulation of its maths, applied where the reference applies it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from trident_core import Params, parse_classes
from trident_core.cli import main
from trident_core.pamr import Pamr, neighbour_weights, propagate

RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def direct_pamr(logits: np.ndarray, guide: np.ndarray, dilations, steps: int) -> np.ndarray:
    """PAMR in float64, one pixel and one neighbour at a time (borders clamped = replicate padding)."""
    k, h, w = guide.shape

    def at(a, y, x):
        return a[..., min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = np.zeros((h, w, 8 * len(dilations)))
    for y in range(h):
        for x in range(w):
            window = [at(guide, y + dy * d, x + dx * d) for d in dilations
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            std = np.std(np.stack(window), axis=0, ddof=1)  # per channel
            scores = []
            for d in dilations:
                for dy, dx in RING:
                    diff = np.abs(guide[:, y, x] - at(guide, y + dy * d, x + dx * d))
                    scores.append(np.mean(-diff / (1e-8 + 0.1 * std)))
            e = np.exp(np.array(scores) - max(scores))
            weights[y, x] = e / e.sum()
    m = logits.astype(np.float64)
    for _ in range(steps):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                p = 0
                for d in dilations:
                    for dy, dx in RING:
                        new[:, y, x] += weights[y, x, p] * at(m, y + dy * d, x + dx * d)
                        p += 1
        m = new
    return m


@pytest.mark.parametrize("dilations,steps", [((1, 3), 3), ((8, 16), 2), ((2,), 1)])
def test_pamr_equals_the_direct_formulation(dilations, steps):
    rng = np.random.default_rng(0)
    guide = rng.normal(size=(3, 9, 13)).astype(np.float32)
    guide[:, 4:, 6:] += 3.0  # an edge the weights must respect
    logits = rng.normal(size=(4, 9, 13)).astype(np.float32)
    ours = Pamr(steps, dilations, torch.from_numpy(guide))(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(ours, direct_pamr(logits, guide, dilations, steps), rtol=0, atol=2e-6)


def test_pamr_blocks_give_the_same_result(monkeypatch):
    """Classes are refined in blocks (bounded memory); the block size must not change a bit."""
    import trident_core.pamr as pamr_mod

    g = torch.randn(3, 20, 24)
    x = torch.randn(7, 20, 24)
    w = neighbour_weights(g, (1, 4))
    whole = propagate(x, w, (1, 4), 3)
    monkeypatch.setattr(pamr_mod, "BLOCK_BYTES", 1)
    assert torch.equal(propagate(x, w, (1, 4), 3), whole)


def test_segment_applies_pamr_to_the_logits_before_the_softmax(small_trident, photo):
    """With PAMR the probabilities are softmax(40 * PAMR(logits)) of the unrefined run's logits, guided by the
    rescaled, CLIP-normalised image resized back (the reference's data-preprocessor output); labels follow them."""
    img = photo[100:140, 200:256]
    cl = parse_classes("sky, person; astronaut, flag")
    plain = small_trident.segment(img, cl, Params())
    seg = small_trident.segment(img, cl, Params().update(pamr_steps=2, pamr_dilations=(2, 5)))
    assert torch.equal(seg.logits(), plain.logits())  # the raw logits stay the coarse ones, as the reference saves
    scaled = cv2.resize(img, (627, 448), interpolation=cv2.INTER_LINEAR).astype(np.float32)  # 40x56 * 11.2
    mean, std = np.array([122.771, 116.746, 104.094]), np.array([68.501, 66.632, 70.323])
    norm = torch.from_numpy(((scaled - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    guide = torch.nn.functional.interpolate(norm, size=(40, 56), mode="bilinear", align_corners=False)[0]
    refined = direct_pamr(plain.logits().numpy(), guide.numpy().astype(np.float64), (2, 5), 2)
    p = torch.from_numpy(refined * 40).softmax(0).numpy()
    probs = np.stack([p[0], np.maximum(p[1], p[2]), p[3]])
    np.testing.assert_allclose(seg.probs.numpy(), probs, atol=2e-6)
    assert (seg.labels.numpy() == probs.argmax(0)).mean() > 0.999
    assert not torch.equal(seg.probs, plain.probs)


@pytest.mark.parametrize("flags,message", [(["--pamr-steps", "-1"], "pamr_steps must be an integer from 0"),
                                           (["--pamr-steps", "2", "--pamr-dilations", "8,x"], "8,16"),
                                           (["--pamr-steps", "2", "--pamr-dilations", "0"], "from 1 to 256"),
                                           (["--pamr-steps", "2", "--pamr-dilations", "100000"], "from 1 to 256"),
                                           (["--pamr-steps", "2", "--pamr-dilations", "1,2,3,4,5,6,7,8,9"],
                                            "1 to 8 whole numbers")])
def test_bad_pamr_options(flags, message, tmp_path, capsys, photo):
    from PIL import Image

    Image.fromarray(photo[:64, :64]).save(tmp_path / "x.png")
    rc = main(["segment", str(tmp_path / "x.png"), "--classes", "a, b", "--no-download", "--out", str(tmp_path),
               *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pamr_equals_the_reference_output():
    """tests/data/pamr_reference.npz holds the reference's own pamr.py output (scripts/make_pamr_golden.py) on a
    crop of a real photo: ours must give the same refined logits."""
    from pathlib import Path

    z = np.load(Path(__file__).parent / "data" / "pamr_reference.npz")
    dilations = tuple(int(d) for d in z["dilations"])
    ours = Pamr(int(z["steps"]), dilations, torch.from_numpy(z["guide"]))(torch.from_numpy(z["logits"]))
    np.testing.assert_allclose(ours.numpy(), z["refined"], rtol=0, atol=1e-7)
