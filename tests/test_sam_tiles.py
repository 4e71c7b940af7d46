"""SAM tiling: the cuts, the rounding and the pixel-to-tile lookup, against direct restatements."""

from __future__ import annotations

import pytest

from trident_core.sam_tiles import SamTiling, cuts, parse_tiles


def test_cuts_cover_the_length_evenly():
    for length in (16, 17, 1024, 1000):
        for parts in (1, 2, 3, 8):
            spans = cuts(length, parts)
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_boxes_are_row_major_on_the_rounded_image():
    t = SamTiling(2, 3, (500, 1601))
    assert t.padded_size == (512, 1616)
    boxes = t.boxes()
    assert len(boxes) == 6
    assert boxes[0] == (0, 256, 0, 538) and boxes[2] == (0, 256, 1077, 1616) and boxes[3][0] == 256
    assert t.boxes((32, 101))[4] == (16, 32, 33, 67)


def test_every_pixel_lands_in_the_tile_whose_box_holds_it():
    t = SamTiling(2, 3, (100, 250))
    h16, w16 = t.padded_size
    boxes = t.boxes()
    for y in range(0, 100, 7):
        for x in range(0, 250, 11):
            i, fy, fx = t.locate(x, y)
            y1, y2, x1, x2 = boxes[i]
            py, px = (y + 0.5) * h16 / 100, (x + 0.5) * w16 / 250
            assert y1 <= py < y2 and x1 <= px < x2
            assert fy == pytest.approx((py - y1) / (y2 - y1)) and fx == pytest.approx((px - x1) / (x2 - x1))


def test_too_many_tiles_for_the_image_are_refused():
    with pytest.raises(ValueError, match="too many"):
        SamTiling(1, 4, (40, 40))


@pytest.mark.parametrize("size", [(2, 3), (17, 5), (10, 30), (1, 1), (16, 2000), (40, 4000)])
def test_auto_tiles_fit_small_and_thin_images(size):
    """"auto" keeps every tile at least 16 pixels each way (a 17x5 image got 3x1 tiles, then a refusal naming a
    tiling nobody chose); a tiling the image cannot hold says what to choose."""
    rows, cols = parse_tiles("auto", size)
    tiling = SamTiling(rows, cols, size)
    assert all(y2 - y1 >= 16 and x2 - x1 >= 16 for y1, y2, x1, x2 in tiling.boxes())
    assert (rows, cols) == {(17, 5): (2, 1), (10, 30): (1, 2), (16, 2000): (1, 8), (40, 4000): (1, 8)}.get(size, (1, 1))
    with pytest.raises(ValueError, match=r"image 2 pixels high and 3 wide: .*use fewer tiles \(1x1 or auto\)"):
        SamTiling.of("1x2", (2, 3))
