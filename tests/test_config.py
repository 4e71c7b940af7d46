"""One config per stage: modes refused with the allowed values named, flat names routed to their stage, the settings
key unchanged, and the command line's choices and the nodes' dropdowns built from the same constants."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from test_nodes import core, import_pack, node_classes, node_info

from trident_core.aggregation import FeatureMap
from trident_core.batch import settings_key
from trident_core.classes import parse_classes
from trident_core.classify import classify
from trident_core.cli import add_model_arguments
from trident_core.config import (
    CORRELATIONS,
    MASK_PROMPT_MODES,
    PARADIGMS,
    AggregateConfig,
    ClassifyConfig,
    Params,
    RefineConfig,
    WindowConfig,
)
from trident_core.download import DEFAULT_FILES, MODELS
from trident_core.inspection import inspection_encodings
from trident_core.presets import get_preset
from trident_core.render import preview


@pytest.mark.parametrize(("config", "name", "allowed"), [
    (AggregateConfig, "paradigm", PARADIGMS), (AggregateConfig, "correlation", CORRELATIONS),
    (RefineConfig, "mask_prompt_mode", MASK_PROMPT_MODES),
])
def test_a_bad_mode_is_refused_naming_the_allowed_ones(config, name, allowed):
    for value in allowed:
        assert getattr(config(**{name: value}), name) == value
    with pytest.raises(ValueError) as e:
        config(**{name: "Affinity"})
    assert str(e.value) == f"{name} must be one of {', '.join(allowed)}, not 'Affinity'"


def test_update_routes_flat_names_to_their_stage():
    base = Params()
    p = base.update(short_side=336, paradigm="segment_then_splice", prob_thd=0.3, pamr_steps=2, iou_thresh=0.5,
                    refine=True, stride=None)
    assert p.windows == WindowConfig(short_side=336)
    assert p.aggregation == AggregateConfig(paradigm="segment_then_splice")
    assert p.classification == ClassifyConfig(prob_thd=0.3, pamr_steps=2)
    assert p.refinement == RefineConfig(iou_thresh=0.5)
    assert p.refine and not base.refine and base.windows.short_side == 448  # a copy; None changes nothing
    assert base.update(logit_scale=30.0).windows is base.windows  # untouched stages are kept as they are
    with pytest.raises(TypeError, match="unknown parameter 'shortside'"):
        base.update(shortside=336)
    with pytest.raises(ValueError, match="stride=400 is out of range"):
        base.update(stride=400)
    assert base.update(window=448, stride=400).windows.stride == 400  # one stage's names are checked together
    with pytest.raises(ValueError, match="pamr_steps must be an integer"):
        base.update(pamr_steps=-1)


def test_settings_key_is_the_one_of_the_flat_parameters():
    """The outputs' completion markers and the eval's resume state hash the parameters by their flat names: the
    digests made before the parameters were split per stage still match."""
    assert set(Params().flat()) == {
        "short_side", "long_cap", "window", "stride", "gamma", "beta", "paradigm", "correlation", "sam_tiles",
        "cos_fac", "refine_neg_cos", "logit_scale", "prob_thd", "pamr_steps", "pamr_dilations", "coarse_thresh",
        "minimal_area", "mask_alpha", "iou_thresh", "mask_prompt_mode", "refine"}
    assert settings_key({"params": Params().flat()}) == (
        "48d843c77efb2b789a04e9be1491e25ca2425b9885185852bca90de63a0249db")
    assert settings_key({"params": get_preset("city_scapes").params.flat()}) == (
        "42ab7db218f535ae38a65d5a47f4fad441e065f57e6de51c1f0a307b8aef9458")


def test_cli_choices_are_the_constants():
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    choices = {a.dest: a.choices for a in ap._actions}
    assert tuple(choices["correlation"]) == CORRELATIONS and tuple(choices["paradigm"]) == PARADIGMS
    assert tuple(choices["mask_prompt_mode"]) == MASK_PROMPT_MODES


def _choices(node: str, name: str) -> tuple:
    return tuple(node_info(node)["input"]["required"][name][1]["options"])


def test_node_dropdowns_are_the_constants():
    config = core("config")
    assert _choices("TridentSpliceAggregate", "correlation") == config.CORRELATIONS == CORRELATIONS
    assert _choices("TridentSpliceAggregate", "paradigm") == config.PARADIGMS
    assert _choices("TridentSpliceAggregate", "sam_tiles") == config.SAM_TILE_CHOICES
    assert _choices("TridentSamRefine", "mask_prompt_mode") == config.MASK_PROMPT_MODES
    assert _choices("TridentInspectPointAffinity", "correlation") == tuple(c for c in config.CORRELATIONS
                                                                          if c != "none")
    assert node_classes()["TridentWindowFeatures"].__name__ == "WindowFeaturesNode"


def test_loaders_preselect_the_default_files():
    for node, role in (("TridentLoadCLIP", "clip"), ("TridentLoadDINO", "dino"), ("TridentLoadSAM", "sam")):
        assert node_info(node)["input"]["required"]["model_name"][1]["default"] == DEFAULT_FILES[role]
        assert any(m.filename == DEFAULT_FILES[role] and m.role == role for m in MODELS.values())


def test_each_image_checks_for_cancel_between_images_and_advances_the_bar(monkeypatch):
    bridge = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"]
    events = []

    class Bar:
        def __init__(self, total):
            events.append(("bar", total))

        def update(self, value):
            events.append(("advance", value))

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    monkeypatch.setattr(bridge, "check_interrupt", lambda: events.append("check"))
    monkeypatch.setattr(bridge, "trim_heap", lambda: events.append("trim"))
    monkeypatch.setattr(bridge, "TRIM_EVERY_S", 0.0)  # (images of seconds: a trim after each)

    def one(a, b, progress):
        events.append(("image", a, b))
        progress("stage")  # the core's stage callback checks too
        return a * b

    assert bridge.each_image(one, [1, 2, 3], [10, 20, 30]) == [10, 40, 90]
    per_image = [("image", 1, 10), "check", "trim", "check", ("advance", 1)]
    assert events[0] == ("bar", 3) and events[1:6] == per_image and len(events) == 17
    assert events[-1] == "trim"  # (the batch's end: trimmed whenever the last paced trim was)
    assert [e for e in events if isinstance(e, tuple) and e[0] == "image"] == [
        ("image", 1, 10), ("image", 2, 20), ("image", 3, 30)]

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    monkeypatch.setattr(bridge, "check_interrupt", cancel)
    seen = []
    with pytest.raises(Cancelled):
        bridge.each_image(lambda a, _progress: seen.append(a), [1, 2, 3])
    assert seen == [1]  # stopped before the second image


def _feature_map(dim: int = 8) -> FeatureMap:
    return FeatureMap(torch.randn(dim, 4, 6), (8, 12), "segment_then_splice", "none", (1, 1))


def test_classify_refuses_embeddings_of_another_clip():
    cl = parse_classes("sky, grass")
    with pytest.raises(ValueError, match="16-d embeddings, the feature map has 8: use the same CLIP"):
        classify(_feature_map(), torch.randn(2, 16), cl, ClassifyConfig())
    assert classify(_feature_map(), torch.randn(2, 8), cl, ClassifyConfig()).labels.shape == (8, 12)


@pytest.mark.parametrize("where", ["features", "text"])
def test_classify_refuses_nan_features_or_embeddings(where):
    """Damaged weights (or an fp16 overflow) gave all-NaN probabilities, an unlabelled map and exit 0."""
    cl, fm, text = parse_classes("sky, grass"), _feature_map(), torch.randn(2, 8)
    (fm.features if where == "features" else text)[1, 0, ...] = float("inf" if where == "text" else "nan")
    with pytest.raises(ValueError, match="hold NaN/Inf values: a model file is damaged"):
        classify(fm, text, cl, ClassifyConfig())


def test_no_sam_encoding_and_no_image_is_one_line():
    with pytest.raises(ValueError, match="no SAM encoding .* connect the image"):
        inspection_encodings(None, sam=None, image=None, image_size=(8, 12))


def test_preview_with_and_without_legend():
    labels = torch.tensor([[0, 1, 1], [1, 0, -1]])
    image = np.full((2, 3, 3), 200, np.uint8)
    colors, blended = preview(labels, ["sky", "grass"], image, alpha=0.5, show_legend=False)
    assert colors.shape == blended.shape == (2, 3, 3) and (colors[1, 2] == 0).all()  # unlabeled: black
    assert (blended[1, 2] == 100).all()
    tall, tall_blend = preview(labels, ["sky", "grass"], image)
    assert tall.shape[0] > 2 and tall.shape == tall_blend.shape and (tall[:2] == colors).all()
    with pytest.raises(ValueError, match="the image is 4x2, the segmentation 3x2"):
        preview(labels, ["sky", "grass"], np.zeros((2, 4, 3), np.uint8))


def test_legend_draws_accented_names_without_question_marks():
    """OpenCV's font draws ASCII only: "café" came out as "caf??" (UTF-8 bytes); its accents are dropped now, and
    the legend equals the one of the plain name."""
    from trident_core.render import drawable, legend

    assert drawable("café") == "cafe" and drawable("Straße") == "Strasse" and drawable("Ærø") == "AEro"
    assert drawable("árbol; niño") == "arbol; nino" and drawable("猫") == "?"
    assert np.array_equal(legend(["café", "niño"], 400), legend(["cafe", "nino"], 400))
    assert not np.array_equal(legend(["café"], 400), legend(["caf"], 400))


def test_presets_are_bundles_of_stage_configs():
    p = get_preset("city_scapes").params
    assert p.aggregation == AggregateConfig(sam_tiles="1x2", cos_fac=3.0, refine_neg_cos=False)
    assert p.windows == WindowConfig(short_side=688) and p.refinement == RefineConfig(coarse_thresh=0.10)
    assert all(dataclasses.is_dataclass(getattr(p, f.name)) for f in dataclasses.fields(p) if f.name != "refine")


def test_sam_tiles_are_checked_when_the_config_is_built():
    assert AggregateConfig(sam_tiles="auto").sam_tiles == "auto" and AggregateConfig(sam_tiles=" 2x3 ")
    with pytest.raises(ValueError, match="'auto' or ROWSxCOLS like '1x2', not 'two'"):
        AggregateConfig(sam_tiles="two")
    with pytest.raises(ValueError, match="9x1: each of rows and cols must be 1..8"):
        AggregateConfig(sam_tiles="9x1")


def test_parameters_are_checked_by_type_where_they_enter():
    """From a review of the library: "False" for refine turned the refinement on; 64.0 for window passed, then
    crashed inside segment; NumPy's scalars (a parameter sweep) were called out of range; sam_tiles=2 and
    Params(windows={...}) ended in AttributeErrors; a list of dilations made Params unhashable."""
    from trident_core.config import Params

    p = Params().update(short_side=np.int64(448), window=64.0, stride=np.float32(32), prob_thd=np.float32(0.25),
                        refine=np.bool_(True), pamr_steps=np.int32(2), pamr_dilations=[1, 2])
    assert (p.windows.short_side, p.windows.window, p.windows.stride) == (448, 64, 32)
    assert all(type(v) is int for v in (p.windows.short_side, p.windows.window, p.windows.stride,
                                        p.classification.pamr_steps))
    assert type(p.classification.prob_thd) is float and p.classification.prob_thd == 0.25
    assert p.refine is True and p.classification.pamr_dilations == (1, 2) and hash(p) == hash(dataclasses.replace(p))
    for flat, message in (({"refine": "False"}, "refine must be True or False, not 'False'"),
                          ({"refine": 1}, "refine must be True or False"),
                          ({"refine_neg_cos": "no"}, "refine_neg_cos must be True or False"),
                          ({"short_side": "448"}, "short_side='448' is not a number: expected a whole number"),
                          ({"prob_thd": torch.tensor(0.2)}, r"prob_thd=tensor\(0.2000\) is not a number"),
                          ({"window": 64.5}, "window=64.5 is out of range: expected a whole number"),
                          ({"window": 4096}, "window=4096 is out of range: expected a whole number from 32 to 1024"),
                          ({"window": 50}, r"stride=224 is out of range.*\(the window, 50\)"),
                          ({"sam_tiles": 2}, "sam_tiles must be text such as 1x1")):
        with pytest.raises(ValueError, match=message):
            Params().update(**flat)
    with pytest.raises(TypeError, match=r"Params\(windows=...\) takes a WindowConfig, not dict"):
        Params(windows={"short_side": 448})


def test_the_heap_is_trimmed_at_most_every_quarter_second(monkeypatch):
    """Frames of milliseconds (a GPU's batches) pay a trim every TRIM_EVERY_S, not one each; images of seconds (the
    CPU) one after each, as before."""
    bridge = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"]
    trims, clock = [], [100.0]
    monkeypatch.setattr(bridge, "trim_heap", lambda: trims.append(clock[0]))
    monkeypatch.setattr(bridge, "progress_bar", lambda total: type("Bar", (), {"update": lambda self, v: None})())
    monkeypatch.setattr(bridge, "check_interrupt", lambda: None)
    monkeypatch.setattr(bridge.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bridge, "_last_trim", [float("-inf")])

    def frames(step):
        def one(i, _progress):
            clock[0] += step
            return i
        return one

    assert bridge.each_image(frames(0.02), list(range(40))) == list(range(40))  # 0.8 s of frames
    paced = trims[:-1]
    assert len(paced) == 4 and all(b - a >= bridge.TRIM_EVERY_S for a, b in zip(paced, paced[1:]))
    assert trims[-1] == clock[0]  # and once more at the end: the last frames' freed heap too
    trims.clear()
    bridge.each_image(frames(1.5), list(range(3)))
    assert len(trims) == 3 + 1


def test_a_missing_comfyui_module_is_looked_for_once(monkeypatch):
    """Outside ComfyUI each frame asks for its modules (interrupts, progress): a missing one is searched for once;
    one put in sys.modules later (as ComfyUI or a test does) is found."""
    bridge = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"]
    tried = []
    real = bridge.importlib.import_module
    monkeypatch.setattr(bridge.importlib, "import_module", lambda name: tried.append(name) or real(name))
    monkeypatch.setattr(bridge, "_ABSENT", set())
    assert [bridge._comfy("comfy_no_such_module") for _ in range(3)] == [None] * 3
    assert tried == ["comfy_no_such_module"]
    fake = types.ModuleType("comfy_no_such_module")
    monkeypatch.setitem(sys.modules, "comfy_no_such_module", fake)
    assert bridge._comfy("comfy_no_such_module") is fake
