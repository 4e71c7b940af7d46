"""Presets: the benchmark class files read with the reference's rule, and the large-vocabulary configurations."""

from __future__ import annotations

from importlib import resources

import pytest

from trident_core import get_preset
from trident_core.config import Params
from trident_core.presets import PRESETS


def reference_rule(text: str) -> tuple[list[str], list[int]]:
    """The reference's get_cls_idx, restated: every line is a class, '; ' separates its names, newlines dropped."""
    names, indices = [], []
    for idx, line in enumerate(text.splitlines(keepends=True)):
        parts = [p.replace("\n", "") for p in line.split("; ")]
        names += parts
        indices += [idx] * len(parts)
    return names, indices


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.class_file])
def test_class_files_parse_as_the_reference(name):
    preset = get_preset(name)
    text = resources.files("trident_core").joinpath("data", preset.class_file).read_text(encoding="utf-8")
    names, indices = reference_rule(text)
    cl = preset.classes()
    # Equal names; context60's last line is "wood " and we drop the space, which CLIP's tokenizer drops as well.
    assert cl.queries == [" ".join(n.split()) for n in names] and cl.query_class == indices


def test_large_vocabulary_presets():
    """cfg_ade847.py and cfg_context459.py change only the class file: the base configuration (448 short side,
    stride 224, cos_fac 1.2, refine_neg_cos, coarse_thresh 0.2, Trident's prob_thd 0.0), no background class."""
    base = Params().update(short_side=448, stride=224, window=336, cos_fac=1.2, refine_neg_cos=True, coarse_thresh=0.2,
                           prob_thd=0.0, iou_thresh=0.80, minimal_area=225, sam_tiles="1x1", refine=False)
    for name, n_classes in (("ade847", 847), ("context459", 459)):
        preset = get_preset(name)
        assert preset.params == base and not preset.background
        assert len(preset.classes()) == n_classes
    ade = get_preset("ade847").classes()
    assert ade.names[1] == "building, edifice" and ade.classes[1] == ("building, edifice",)
    assert get_preset("context459").classes().names[:3] == ["accordion", "aeroplane", "air conditioner"]
