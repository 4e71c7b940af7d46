"""The ComfyUI nodes without ComfyUI: the pack imported as ComfyUI imports it, every node's V3 declaration (as
/object_info serves it), every node run on small random-weight models (batch of 2), and the ComfyUI side (folders,
model management, progress, cancellation) against stand-ins that behave like ComfyUI's modules."""

from __future__ import annotations

import asyncio
import functools
import http.server
import importlib.util
import inspect
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from pack_import import core, import_pack

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DEFAULT_NAMES = {"open_clip": "ViT-B-16_openai_open_clip_model.safetensors", "dino": "dino_vitbase16_pretrain.pth",
                 "sams": "sam_vit_b_01ec64.pth"}
CLASSES = "sky, person; Astronaut, flag"


def make_models_dir(root: Path, ckpts: dict[str, Path]) -> Path:
    """ComfyUI-style model folders holding the small checkpoints, under test names and the default file names."""
    files = {"open_clip": [ckpts["clip"], ckpts["clip_bin"]], "dino": [ckpts["dino"]], "sams": [ckpts["sam"]]}
    for sub, paths in files.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for p in paths:
            (root / sub / p.name).symlink_to(p)
        (root / sub / DEFAULT_NAMES[sub]).symlink_to(paths[0])
    return root


@functools.cache
def node_classes() -> dict[str, type]:
    """The pack's nodes by id, as ComfyUI registers them: the list of comfy_entrypoint's extension, each under its
    schema's node_id."""
    async def listed() -> list[type]:
        return await (await import_pack().comfy_entrypoint()).get_node_list()

    return {cls.define_schema().node_id: cls for cls in asyncio.run(listed())}


def node_info(node_type: str) -> dict:
    """A node as /object_info serves it."""
    return node_classes()[node_type].GET_NODE_INFO_V1()


def run(node_type: str, **inputs) -> tuple:
    """A node's outputs from its `execute` classmethod, as ComfyUI's executor calls it: in inference mode (the
    loaders' weights and every output are inference tensors, which keep no version counter and refuse in-place
    changes outside it)."""
    with torch.inference_mode():
        return tuple(node_classes()[node_type].execute(**inputs).args)


def as_image(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 arrays to a ComfyUI IMAGE batch [B, H, W, 3] float 0..1."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


@pytest.fixture(scope="module")
def models(small_ckpts, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = make_models_dir(tmp_path_factory.mktemp("models"), small_ckpts)
        mp.setenv("TRIDENT_MODELS_DIR", str(root))
        mp.setenv("TRIDENT_NO_DOWNLOAD", "1")
        yield root


@pytest.fixture(scope="module")
def loaded(models):
    (clip,) = run("TridentLoadCLIP", model_name="clip_small.safetensors", precision="auto", allow_download=False)
    (dino,) = run("TridentLoadDINO", model_name="dino_small.pth", precision="fp32", allow_download=False)
    (sam,) = run("TridentLoadSAM", model_name="sam_small.pth", precision="auto", allow_download=False)
    return clip, dino, sam


@pytest.fixture(scope="module")
def images(photo) -> torch.Tensor:
    return as_image(photo[:64, :192], photo[200:264, 100:292])


# ---------------------------------------------------------------------------------------------- declarations

def test_pack_imports_like_comfyui_and_registers_through_the_entrypoint_only():
    pack = import_pack()
    assert callable(pack.comfy_entrypoint) and not hasattr(pack, "NODE_CLASS_MAPPINGS")  # ComfyUI would ignore it
    nodes = node_classes()
    assert len(nodes) == 15 and all(k.startswith("Trident") for k in nodes)
    assert all(cls.define_schema().display_name.startswith("Trident ") for cls in nodes.values())
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


def check_declared_input(name: str, entry: list) -> None:
    """An /object_info input has a tooltip; a widget a default within its range or among its choices; a
    DynamicCombo's choices declare their own inputs alike."""
    kind, opts = entry
    assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{name}: no tooltip"
    if kind == "COMBO":
        assert opts["options"] and opts["default"] in opts["options"], f"{name}: default not a choice"
    elif kind == "COMFY_DYNAMICCOMBO_V3":
        assert len({o["key"] for o in opts["options"]}) == len(opts["options"]) > 1
        for option in opts["options"]:
            for sub, sub_entry in option["inputs"].get("required", {}).items():
                assert sub_entry[0] in WIDGET_TYPES, f"{name}.{sub}"
                check_declared_input(f"{name}.{sub}", sub_entry)
    elif kind in WIDGET_TYPES:
        assert "default" in opts, f"{name}: widget without default"
        if kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"]
    else:
        assert kind in ("IMAGE", "MASK") or kind.startswith("TRIDENT_"), kind


@pytest.mark.parametrize("node_type", sorted(node_classes()))
def test_node_declaration(node_type, models):
    info = node_info(node_type)
    assert info["category"] == "segmentation/trident" and info["name"] == node_type
    assert isinstance(info["description"], str) and len(info["description"]) > 40
    spec = info["input"]
    assert set(spec) <= {"required", "optional"} and spec["required"]
    names = []
    for section in spec.values():
        for name, entry in section.items():
            names.append(name)
            check_declared_input(name, entry)
    rt, rn, tips = info["output"], info["output_name"], info["output_tooltips"]
    assert rt and len(rn) == len(rt) == len(tips) and all(isinstance(t, str) and len(t) > 10 for t in tips)
    assert all(t in ("IMAGE", "MASK", "SEGS", "STRING", "INT") or t.startswith("TRIDENT_") for t in rt)
    fn = node_classes()[node_type].execute
    params = list(inspect.signature(fn).parameters)
    assert params == names, "execute's parameters must be the inputs, in order"
    optional = set(spec.get("optional", {}))
    assert all((inspect.signature(fn).parameters[p].default is not inspect.Parameter.empty) == (p in optional)
               for p in params)


def test_custom_types_connect(models):
    """Every TRIDENT_* input type is produced by some node, and every produced type is consumed by some node."""
    infos = [node_info(n) for n in node_classes()]
    produced = {t for i in infos for t in i["output"] if t.startswith("TRIDENT_")}
    consumed = {e[0] for i in infos for s in i["input"].values() for e in s.values() if e[0].startswith("TRIDENT_")}
    assert produced == consumed == {"TRIDENT_CLIP", "TRIDENT_DINO", "TRIDENT_SAM", "TRIDENT_CLASSES",
                                    "TRIDENT_WINDOW_FEATURES", "TRIDENT_FEATURE_MAP", "TRIDENT_SAM_ENCODING",
                                    "TRIDENT_SEGMENTATION"}


# ------------------------------------------------------------------------------------------------- loaders

def test_loader_dropdowns_list_present_then_known_files(models):
    clip = node_info("TridentLoadCLIP")["input"]["required"]["model_name"]
    assert clip[1]["options"] == ["ViT-B-16_openai_open_clip_model.safetensors", "clip_small.bin",
                                  "clip_small.safetensors", "ViT-B-16.pt",
                                  "ViT-H-14_laion2b_s32b_b79k_open_clip_model.safetensors"]
    assert clip[1]["default"] == "ViT-B-16_openai_open_clip_model.safetensors"
    sam = node_info("TridentLoadSAM")["input"]["required"]["model_name"][1]["options"]
    assert sam == ["sam_small.pth", "sam_vit_b_01ec64.pth", "sam_vit_l_0b3195.pth", "sam_vit_h_4b8939.pth"]
    dino = node_info("TridentLoadDINO")["input"]["required"]["model_name"][1]["options"]
    assert dino == ["dino_small.pth", "dino_vitbase16_pretrain.pth", "dino_deitsmall16_pretrain.pth"]


def test_loaders_give_the_core_models(loaded):
    clip, dino, sam = loaded
    assert (clip.model.arch, dino.model.arch, sam.model.arch) == ("ViT-w64-L2-p16", "ViT-64/16", "vit_64x2")
    assert clip.patcher is None and clip.model.device.type == "cpu" and clip.model.dtype == torch.float32


def test_missing_known_file_names_file_folder_and_switch(models):
    ModelFileMissing = core("download").ModelFileMissing

    with pytest.raises(ModelFileMissing) as e:
        run("TridentLoadSAM", model_name="sam_vit_h_4b8939.pth", precision="auto", allow_download=True)
    msg = str(e.value)
    assert "sam_vit_h_4b8939.pth" in msg and str(models / "sams") in msg and "TRIDENT_NO_DOWNLOAD" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    with pytest.raises(ModelFileMissing, match="turned off"):
        run("TridentLoadDINO", model_name="dino_deitsmall16_pretrain.pth", precision="auto", allow_download=False)
    with pytest.raises(ModelFileMissing, match="not a known model file"):
        run("TridentLoadCLIP", model_name="mine.safetensors", precision="auto", allow_download=True)


def test_bare_known_name_finds_the_file_in_a_subfolder(models):
    nested = models / "sams" / "mine" / "sam_vit_l_0b3195.pth"
    nested.parent.mkdir()
    nested.symlink_to(models / "sams" / "sam_small.pth")
    try:
        choices = node_info("TridentLoadSAM")["input"]["required"]["model_name"][1]["options"]
        assert "mine/sam_vit_l_0b3195.pth" in choices and "sam_vit_l_0b3195.pth" in choices  # workflows keep working
        (sam,) = run("TridentLoadSAM", model_name="sam_vit_l_0b3195.pth", precision="auto", allow_download=True)
        assert sam.model.path == str(nested)
    finally:
        shutil.rmtree(nested.parent)


def test_wrong_file_and_precision_errors(models, small_ckpts):
    CheckpointError = core("checkpoints").CheckpointError

    shutil.copy(small_ckpts["dino"], models / "open_clip" / "a_dino.pth")
    try:
        with pytest.raises(CheckpointError, match="is not an open_clip CLIP checkpoint"):
            run("TridentLoadCLIP", model_name="a_dino.pth", precision="auto", allow_download=False)
    finally:
        (models / "open_clip" / "a_dino.pth").unlink()
    with pytest.raises(ValueError, match="needs a GPU"):
        run("TridentLoadSAM", model_name="sam_small.pth", precision="fp16", allow_download=False)


def test_missing_known_file_is_downloaded_into_the_first_folder(models, small_ckpts, monkeypatch):
    """A local server stands in for the official host (TRIDENT_DOWNLOAD_MIRROR); the progress bar is fed."""
    served = {"/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth": small_ckpts["dino"].read_bytes()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"]
    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    monkeypatch.delenv("TRIDENT_NO_DOWNLOAD")
    monkeypatch.setenv("TRIDENT_DOWNLOAD_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    target = models / "dino" / "dino_deitsmall16_pretrain.pth"
    try:
        (dino,) = run("TridentLoadDINO", model_name="dino_deitsmall16_pretrain.pth", precision="auto",
                      allow_download=True)
    finally:
        server.shutdown()
    try:
        assert target.read_bytes() == small_ckpts["dino"].read_bytes() and dino.model.path == str(target)
        size = target.stat().st_size
        assert updates and updates[-1] == (size, size)
    finally:
        target.unlink()


# ------------------------------------------------------------------------------------------- stages, batch of 2

@pytest.fixture(scope="module")
def chain(loaded, images):
    """Every stage node on a batch of two images with the default preset's parameters."""
    clip, dino, sam = loaded
    (classes,) = run("TridentEncodeClasses", clip=clip, classes=CLASSES)
    (wf,) = run("TridentWindowFeatures", image=images, clip=clip, dino=dino, short_side=448, window=336, stride=224)
    fm, encodings = run("TridentSpliceAggregate", window_features=wf, sam=sam, image=images, correlation="affinity",
                        paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    (coarse,) = run("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0)
    (refined,) = run("TridentSamRefine", segmentation=coarse, sam=sam, image=images, coarse_thresh=0.2,
                     minimal_area=225, mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="reference",
                     sam_encoding=encodings)
    return {"classes": classes, "wf": wf, "fm": fm, "encodings": encodings, "coarse": coarse, "refined": refined}


def test_stage_outputs_per_image(chain, images):
    assert chain["classes"].text.shape == (4, 32) and chain["classes"].classes.names == ["sky", "person", "flag"]
    assert len(chain["wf"].items) == len(chain["fm"]) == len(chain["coarse"]) == len(chain["refined"]) == 2
    for fm, enc, coarse, refined in zip(chain["fm"], chain["encodings"], chain["coarse"], chain["refined"]):
        assert fm.image_size == (64, 192) and enc.tiling.image_size == (64, 192) and enc.whole is enc.encodings[0]
        assert fm.features.shape == (32, 21, 64)  # SAM's valid grid of a 64x192 image
        assert coarse.labels.shape == (64, 192) and coarse.probs.shape == (3, 64, 192)
        assert torch.equal(coarse.labels, coarse.probs.argmax(0)) and 0 <= coarse.probs.min() <= coarse.probs.max() <= 1
        assert refined.refined and torch.equal(refined.labels_coarse, coarse.labels)
        assert coarse.labels.device.type == "cpu" and enc.whole.q.device.type == "cpu"
    assert not torch.equal(chain["coarse"][0].labels, chain["coarse"][1].labels[:, :192])


def test_stage_chain_equals_trident_segment_and_the_core(chain, loaded, images):
    """The one-node path, the stage nodes and trident_core itself agree; image 2 of the batch is segmented as if
    it were alone."""
    clip, dino, sam = loaded
    Params, Trident = core("config").Params, core("pipeline").Trident
    (segs,) = run("TridentSegment", image=images, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default",
                  refine=True, sam_tiles="preset")
    direct = Trident(clip.model, dino.model, sam.model).segment(images[1], CLASSES, Params(refine=True))
    for a, b in zip(segs, chain["refined"]):
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.probs, b.probs, atol=1e-6)
    # a segmentation kept by a node stores refined scores in float16 (and nothing where they are the logits' softmax)
    want = direct.probs if segs[1].stored_probs is None else direct.probs.half().float()
    assert torch.equal(direct.labels, segs[1].labels) and torch.equal(want, segs[1].probs)


def test_pamr_input_on_classify_and_segment(chain, loaded, images):
    """PAMR through Trident Classify (with the image) equals Trident Segment's pamr_steps and the core's."""
    clip, dino, sam = loaded
    Params, Trident = core("config").Params, core("pipeline").Trident
    (pamr,) = run("TridentClassify", feature_map=chain["fm"], classes=chain["classes"], logit_scale=40.0,
                  prob_thd=0.0, image=images, pamr_steps=2, pamr_dilations="8,16", short_side=448)
    (segs,) = run("TridentSegment", image=images, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default",
                  refine=False, sam_tiles="preset", pamr_steps=2)
    direct = Trident(clip.model, dino.model, sam.model).segment(images[1], CLASSES, Params().update(pamr_steps=2))
    for a, b in zip(pamr, segs):
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.probs, b.probs, atol=1e-6)
    assert torch.equal(direct.labels, segs[1].labels.long())
    # PAMR's probabilities are not the low-resolution logits' softmax: a node output keeps them in float16
    assert torch.allclose(direct.probs, segs[1].probs, atol=1e-3)
    assert not torch.equal(pamr[0].probs, chain["coarse"][0].probs)
    with pytest.raises(ValueError, match="PAMR needs the image"):
        run("TridentClassify", feature_map=chain["fm"], classes=chain["classes"], logit_scale=40.0, prob_thd=0.0,
            pamr_steps=2)
    with pytest.raises(ValueError, match="whole numbers from 1 to 256 separated by commas"):
        run("TridentClassify", feature_map=chain["fm"], classes=chain["classes"], logit_scale=40.0, prob_thd=0.0,
            image=images, pamr_steps=2, pamr_dilations="8;16")


@pytest.mark.parametrize("dilations,message", [("100000", "from 1 to 256"), ("1,2,3,4,5,6,7,8,9", "1 to 8 whole"),
                                               ("8;16", "separated by commas")])
def test_classify_refuses_pamr_dilations_before_the_graph_runs(dilations, message):
    """ComfyUI asks validate_inputs before any node runs: dilations that execute refuses are refused there (they
    were met after CLIP, DINO and SAM had run)."""
    assert node_classes()["TridentClassify"].validate_inputs(pamr_dilations="8,16") is True
    assert message in node_classes()["TridentClassify"].validate_inputs(pamr_dilations=dilations)


def test_classify_guides_pamr_at_the_scale_window_features_used(loaded, images):
    """Window Features at short_side 336: Classify's PAMR guide follows it by default (it took 448 unless set by
    hand), as Trident Segment and the library run the same settings; a short side typed in is still used."""
    clip, dino, sam = loaded
    Params, Trident = core("config").Params, core("pipeline").Trident
    (classes,) = run("TridentEncodeClasses", clip=clip, classes=CLASSES)
    (wf,) = run("TridentWindowFeatures", image=images, clip=clip, dino=dino, short_side=336, window=336, stride=224)
    (fm,) = run("TridentSpliceAggregate", window_features=wf, sam=sam, image=images, correlation="affinity",
                paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)[:1]
    settings = dict(feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0, image=images, pamr_steps=2)
    (same,) = run("TridentClassify", **settings)
    (typed,) = run("TridentClassify", **settings, short_side=448)
    params = Params().update(short_side=336, stride=224, pamr_steps=2)
    direct = Trident(clip.model, dino.model, sam.model).segment(images[1], CLASSES, params)
    assert torch.equal(direct.labels, same[1].labels.long())
    assert torch.allclose(direct.probs, same[1].probs, atol=1e-3)
    assert not torch.allclose(typed[1].probs, same[1].probs, atol=1e-3)


def test_trident_segment_presets_background_and_tiles(loaded, images):
    clip, dino, sam = loaded
    (voc,) = run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes="", preset="voc20",
                 refine=False, sam_tiles="1x2")
    assert len(voc[0].classes) == 20 and not voc[0].refined
    (bg,) = run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes="person", preset="default",
                refine=False, sam_tiles="preset", background="sky; space")
    assert bg[0].classes.has_background and bg[0].classes.names == ["sky", "person"]
    with pytest.raises(core("classes").ClassListError, match="no class names"):
        run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes=" , ", preset="default",
            refine=False, sam_tiles="preset")
    with pytest.raises(core("classes").ClassListError, match="no class names"):
        run("TridentEncodeClasses", clip=clip, classes="")


def test_custom_preset_is_the_default_with_the_values_shown_under_it(loaded, images):
    """Inside ComfyUI the preset arrives as its DynamicCombo value: the choice and the inputs shown under it in one
    dict. 'custom' at the default's values is the default preset; changed values give what trident_core gives
    with those parameters; a named preset as a dict is that preset."""
    clip, dino, sam = loaded
    Params, Trident = core("config").Params, core("pipeline").Trident
    common = dict(image=images[1:], clip=clip, dino=dino, sam=sam, classes=CLASSES, refine=True, sam_tiles="preset")
    at_default = dict(short_side=448, stride=224, cos_fac=1.2, refine_neg_cos=True, prob_thd=0.0, coarse_thresh=0.2)
    changed = dict(short_side=336, stride=112, cos_fac=0.0, refine_neg_cos=False, prob_thd=0.3, coarse_thresh=0.1)
    (default,) = run("TridentSegment", preset="default", **common)
    (same,) = run("TridentSegment", preset={"preset": "custom", **at_default}, **common)
    (named,) = run("TridentSegment", preset={"preset": "default"}, **common)
    assert torch.equal(same[0].labels, default[0].labels) and torch.equal(named[0].labels, default[0].labels)
    (custom,) = run("TridentSegment", preset={"preset": "custom", **changed}, **common)
    direct = Trident(clip.model, dino.model, sam.model).segment(images[1], CLASSES,
                                                               Params().update(refine=True, **changed))
    assert torch.equal(custom[0].labels, direct.labels) and not torch.equal(custom[0].labels, default[0].labels)
    segment = node_classes()["TridentSegment"]
    assert segment.validate_inputs(classes="sky, grass", preset={"preset": "custom", "short_side": None}) is True
    assert "no class names" in segment.validate_inputs(classes="", preset={"preset": "custom"}, background="")


def test_preset_class_lists_load_inside_comfyui_without_a_global_trident_core(monkeypatch):
    """ComfyUI imports the pack under its path; no `trident_core` is importable by that name there."""
    monkeypatch.setitem(sys.modules, "trident_core", None)  # `import trident_core` now fails, as in ComfyUI
    presets = core("presets")
    assert len(presets.get_preset("voc21").class_list("")) == 21
    assert presets.get_preset("coco_object").class_list("person, dog").names[1:] == ["person", "dog"]


def test_typed_multiline_classes_and_preset_background(loaded, images):
    """Typed as people do (commas on a line, more on the next), with voc21: every typed name is its own
    foreground class, voc21's background is class 0, and Segmentation to Masks finds each typed name."""
    clip, dino, sam = loaded
    (enc,) = run("TridentEncodeClasses", clip=clip, classes="sky, person\nflag, grass")
    assert enc.classes.names == ["sky", "person", "flag", "grass"] and not enc.classes.has_background
    (segs,) = run("TridentSegment", image=images[:1], clip=clip, dino=dino, sam=sam, classes="person, flag\nrocket",
                  preset="voc21", refine=False, sam_tiles="preset")
    cl = segs[0].classes
    assert cl.has_background and cl.names[1:] == ["person", "flag", "rocket"] and cl.names[0] != "person"
    mask, _ = run("TridentSegmentationToMasks", segmentation=segs, classes="person\nrocket", invert=False)
    assert torch.equal(mask[0], ((segs[0].labels == 1) | (segs[0].labels == 3)).float())


def test_segment_then_splice_needs_no_sam_and_mismatches_are_refused(chain, loaded, images):
    clip, dino, sam = loaded
    fm, encodings = run("TridentSpliceAggregate", window_features=chain["wf"], image=images, correlation="affinity",
                        paradigm="segment_then_splice", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    assert encodings == [None, None] and fm[0].features.shape == (32, 28, 84)  # the 448x1344 CLIP grid
    with_sam, _ = run("TridentSpliceAggregate", window_features=chain["wf"], sam=sam, image=images,
                      correlation="affinity", paradigm="segment_then_splice", sam_tiles="1x1", cos_fac=1.2,
                      refine_neg_cos=True)
    assert all(torch.equal(a.features, b.features) for a, b in zip(fm, with_sam))
    with pytest.raises(ValueError, match="splice_then_segment paradigm needs a SAM model"):
        run("TridentSpliceAggregate", window_features=chain["wf"], image=images, correlation="affinity",
            paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    for refine in (True, False):  # (what to do on this node: it has no paradigm to choose)
        with pytest.raises(ValueError, match="needs a SAM model .*connect one \\(Trident Load SAM\\) to the 'sam'"):
            run("TridentSegment", image=images, clip=clip, dino=dino, classes=CLASSES, preset="default",
                refine=refine, sam_tiles="preset")
    with pytest.raises(ValueError, match="the image batch has 1 image"):
        run("TridentSpliceAggregate", window_features=chain["wf"], sam=sam, image=images[:1], correlation="affinity",
            paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    wrong = type(chain["classes"])(chain["classes"].classes, torch.zeros(4, 16))
    with pytest.raises(ValueError, match="same CLIP"):
        run("TridentClassify", feature_map=chain["fm"], classes=wrong, logit_scale=40.0, prob_thd=0.0)


def test_classes_encoded_by_another_clip_of_the_same_width_are_refused(chain, loaded, models, tmp_path):
    """Another CLIP's text embeddings of the same width compared as noise (21.7 % of the labels moved) without a
    word; the same CLIP loaded again (another loader node, a link to its file) is the same CLIP."""
    from factory import small_clip_state
    from safetensors.torch import save_file

    other_file = tmp_path / "other_clip.safetensors"
    save_file(small_clip_state(seed=7), str(other_file))
    other = core("models").load_clip(other_file)
    (cl,) = run("TridentEncodeClasses", clip=type(loaded[0])(other, loaded[0].patcher), classes=CLASSES)
    assert cl.text.shape == chain["classes"].text.shape
    with pytest.raises(ValueError, match=r"the classes were encoded by CLIP .*other_clip\.safetensors, the feature "
                                         r"map was made with CLIP .*: use the same CLIP"):
        run("TridentClassify", feature_map=chain["fm"], classes=cl, logit_scale=40.0, prob_thd=0.0)
    link = tmp_path / "same_clip.safetensors"
    link.symlink_to(loaded[0].model.path)
    again = core("models").load_clip(link)
    (same,) = run("TridentEncodeClasses", clip=type(loaded[0])(again, loaded[0].patcher), classes=CLASSES)
    (segs,) = run("TridentClassify", feature_map=chain["fm"], classes=same, logit_scale=40.0, prob_thd=0.0)
    assert torch.equal(segs[0].labels, chain["coarse"][0].labels)


# ------------------------------------------------------------------------------------------------- outputs

def test_masks_union_synonyms_invert_and_per_class(chain):
    segs = chain["refined"]
    mask, per_class = run("TridentSegmentationToMasks", segmentation=segs, classes="ASTRONAUT, flag", invert=False)
    assert mask.shape == (2, 64, 192) and per_class.shape == (4, 64, 192) and mask.dtype == torch.float32
    for b, seg in enumerate(segs):
        assert torch.equal(mask[b], ((seg.labels == 1) | (seg.labels == 2)).float())
        for j, k in enumerate((1, 2)):  # the named classes only, in class order
            assert torch.equal(per_class[b * 2 + j], (seg.labels == k).float())
    inverted, _ = run("TridentSegmentationToMasks", segmentation=segs, classes="person; flag", invert=True)
    assert torch.equal(inverted, 1 - mask)
    everything, every_class = run("TridentSegmentationToMasks", segmentation=segs, classes="", invert=False)
    assert torch.equal(everything, torch.stack([(s.labels >= 0).float() for s in segs]))
    assert torch.equal(every_class, torch.stack([(s.labels == k).float() for s in segs for k in range(3)]))
    with pytest.raises(core("classes").ClassListError, match="'dog'"):
        run("TridentSegmentationToMasks", segmentation=segs, classes="dog", invert=False)
    assert segs[0].classes.has_background is False  # (separators alone name no class: the test below has one)


def test_masks_of_every_class_leave_out_the_background(chain, loaded):
    """Empty `classes` with a background class: the union and the masks of the other classes (as Trident
    Instances counts them); the background was an all-white mask of the whole image."""
    (classes,) = run("TridentEncodeClasses", clip=loaded[0], classes="person; astronaut, flag", background="sky")
    (segs,) = run("TridentClassify", feature_map=chain["fm"], classes=classes, logit_scale=40.0, prob_thd=0.0)
    assert segs[0].classes.has_background and segs[0].classes.names == ["sky", "person", "flag"]
    for text in ("", " , ", ";", "\n"):  # (separators alone: the background was a class then, all white)
        mask, per_class = run("TridentSegmentationToMasks", segmentation=segs, classes=text, invert=False)
        assert torch.equal(mask, torch.stack([(s.labels >= 1).float() for s in segs]))
        assert torch.equal(per_class, torch.stack([(s.labels == k).float() for s in segs for k in (1, 2)]))


def test_preview_colours_overlay_and_legend(chain, images):
    palette = core("render").palette
    segs = chain["refined"]
    colors, over = run("TridentPreviewSegmentation", segmentation=segs, image=images, alpha=0.5, show_legend=True)
    assert colors.shape == over.shape and colors.shape[0] == 2 and colors.shape[1] > 64 and colors.shape[2] == 192
    pal = torch.from_numpy(palette(3)).float() / 255
    for b, seg in enumerate(segs):
        lab = seg.labels.long()
        want = torch.where((lab >= 0)[..., None], pal[lab.clamp(min=0)], torch.zeros(3))
        assert torch.equal(colors[b, :64], want)
        assert torch.allclose(over[b, :64], (images[b] + want) / 2, atol=1 / 255 + 1e-6)
        assert torch.equal(colors[b, 64:], over[b, 64:])  # the same legend under both
    plain, plain_over = run("TridentPreviewSegmentation", segmentation=segs, image=images, alpha=1.0,
                            show_legend=False)
    assert plain.shape == (2, 64, 192, 3) and torch.equal(plain, plain_over)
    with pytest.raises(ValueError, match="connect the segmented image"):
        run("TridentPreviewSegmentation", segmentation=segs, image=images[:1], alpha=0.5, show_legend=True)
    for alpha in (float("nan"), float("inf"), -1.0, 3.0, "0.5"):  # (through a link: ComfyUI checks widgets only)
        with pytest.raises(ValueError, match="alpha must be a number from 0"):
            run("TridentPreviewSegmentation", segmentation=segs, image=images, alpha=alpha, show_legend=True)


def test_inspect_nodes(chain, loaded, images):
    pca_rgb = core("inspection").pca_rgb
    _, _, sam = loaded
    (pca,) = run("TridentInspectFeatures", feature_map=chain["fm"])
    assert pca.shape == (2, 64, 192, 3) and torch.equal(pca[1], pca_rgb(chain["fm"][1].features, (64, 192)))
    heat, prob = run("TridentInspectClassProbability", segmentation=chain["refined"], class_name="astronaut",
                     coarse=True)
    assert heat.shape == (2, 64, 192, 3) and torch.equal(prob[0], chain["refined"][0].probs_coarse[1])
    heat, aff = run("TridentInspectPointAffinity", feature_map=chain["fm"], sam=sam, x=0.25, y=0.5,
                    units="fraction", correlation="affinity", cos_fac=1.2, refine_neg_cos=True,
                    sam_encoding=chain["encodings"])
    assert heat.shape == (2, 64, 192, 3) and aff.shape == (2, 64, 192)
    assert torch.allclose(aff.amax(dim=(1, 2)), torch.ones(2)) and aff.min() >= 0
    stts, _ = run("TridentSpliceAggregate", window_features=chain["wf"], sam=sam, image=images,
                  correlation="affinity", paradigm="segment_then_splice", sam_tiles="1x1", cos_fac=1.2,
                  refine_neg_cos=True)
    _, again = run("TridentInspectPointAffinity", feature_map=stts, sam=sam, x=48, y=32, units="pixels",
                   correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=images)
    assert torch.allclose(again, aff, atol=1e-6)  # the same point, SAM encoded again
    with pytest.raises(ValueError, match="connect the image"):
        run("TridentInspectPointAffinity", feature_map=stts, sam=sam, x=0.5, y=0.5, units="fraction",
            correlation="affinity", cos_fac=1.2, refine_neg_cos=True)
    for encodings in (None, [None, None]):  # (with the encodings too, the image's batch is the fault named)
        with pytest.raises(ValueError, match="1 image\\(s\\) for a feature map of 2"):
            run("TridentInspectPointAffinity", feature_map=stts, sam=sam, x=0.5, y=0.5, units="fraction",
                correlation="affinity", cos_fac=1.2, refine_neg_cos=True, image=images[:1], sam_encoding=encodings)


def snapshot(obj: object) -> object:
    """A deep, independent copy of a node output's state: every tensor cloned (with its device and dtype), every
    object's attributes (its __dict__, so a value cached onto it later shows), containers item by item. Models
    (which ComfyUI moves between devices) are left out."""
    handle = core("models")
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().clone(), obj.device, obj.dtype)
    if isinstance(obj, np.ndarray):
        return ("array", obj.copy())
    if isinstance(obj, (handle.ClipModel, handle.DinoModel, handle.SamModel)) or type(obj).__name__ == "ModelHandle":
        return ("model", id(obj))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [snapshot(v) for v in obj])
    if isinstance(obj, dict):
        return ("dict", {k: snapshot(v) for k, v in obj.items()})
    if hasattr(obj, "__dict__"):
        return (type(obj).__name__, {k: snapshot(v) for k, v in vars(obj).items()})
    return ("value", obj)


def same_state(a: object, b: object, where: str = "output") -> None:
    """Two snapshots are equal: same structure and attributes, tensors equal bit for bit on the same device."""
    assert a[0] == b[0], f"{where}: {a[0]} became {b[0]}"
    if a[0] == "tensor":
        assert a[2] == b[2] and a[3] == b[3] and torch.equal(a[1], b[1]), f"{where}: tensor changed"
    elif a[0] == "array":
        assert np.array_equal(a[1], b[1]), f"{where}: array changed"
    elif isinstance(a[1], list):
        assert len(a[1]) == len(b[1]), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a[1], b[1])):
            same_state(x, y, f"{where}[{i}]")
    elif isinstance(a[1], dict):
        assert a[1].keys() == b[1].keys(), f"{where}: attributes {set(a[1]) ^ set(b[1])} added or removed"
        for k in a[1]:
            same_state(a[1][k], b[1][k], f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a} became {b}"


def tensors(obj: object, seen: set | None = None):
    """Every tensor inside a node output (models left out)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or type(obj).__name__ in ("ModelHandle", "ClipModel", "DinoModel", "SamModel"):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v, seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from tensors(v, seen)


def test_graph_run_twice_leaves_every_upstream_output_as_it_was(loaded, images):
    """ComfyUI caches each output and hands the same object to the next run: no node may change what an upstream
    node returned (SAM Refine once wrote SAM's image embedding onto Classify's segmentation). Every output is
    snapshotted when made, every downstream node then runs twice, and each output must equal its snapshot; every
    tensor returned lives on the intermediate device (the CPU here)."""
    clip, dino, sam = loaded
    made: dict[str, tuple[object, object]] = {}

    def node(name: str, **inputs) -> tuple:
        out = run(name.split("#")[0], **inputs)
        if name not in made:
            made[name] = (out, snapshot(out))
        return out

    def graph() -> None:
        (classes,) = node("TridentEncodeClasses", clip=clip, classes=CLASSES)
        (wf,) = node("TridentWindowFeatures", image=images, clip=clip, dino=dino, short_side=448, window=336,
                     stride=224)
        fm, encodings = node("TridentSpliceAggregate", window_features=wf, sam=sam, image=images,
                             correlation="affinity", paradigm="splice_then_segment", sam_tiles="1x1", cos_fac=1.2,
                             refine_neg_cos=True)
        (coarse,) = node("TridentClassify", feature_map=fm, classes=classes, logit_scale=40.0, prob_thd=0.0)
        (refined,) = node("TridentSamRefine", segmentation=coarse, sam=sam, image=images, coarse_thresh=0.2,
                          minimal_area=225, mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="reference",
                          sam_encoding=encodings)
        node("TridentSamRefine#2", segmentation=refined, sam=sam, image=images, coarse_thresh=0.2, minimal_area=225,
             mask_alpha=0.005, iou_thresh=0.8, mask_prompt_mode="batched")
        node("TridentSegmentationToMasks", segmentation=refined, classes="person", invert=False)
        node("TridentPreviewSegmentation", segmentation=refined, image=images, alpha=0.5, show_legend=True)
        node("TridentInspectFeatures", feature_map=fm)
        node("TridentInspectClassProbability", segmentation=refined, class_name="sky", coarse=True)
        node("TridentInspectPointAffinity", feature_map=fm, sam=sam, x=0.25, y=0.5, units="fraction",
             correlation="affinity", cos_fac=1.2, refine_neg_cos=True, sam_encoding=encodings)
        node("TridentSegment", image=images, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="voc21",
             refine=True, sam_tiles="preset")

    graph()
    graph()  # the second run: the same cached upstream objects again
    for name, (out, snap) in made.items():
        same_state(snap, snapshot(out), name)
        for t in tensors(out):
            assert t.device == torch.device("cpu"), f"{name} returned a tensor on {t.device}"


# ----------------------------------------------------------------------------------- inside ComfyUI (stand-ins)

class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def fake_comfy(folders: dict[str, list[str]], models_dir: Path, interrupt_after: int | None = None,
               fp16: bool = False, bf16: bool = False) -> dict:
    """Modules that behave like ComfyUI's folder_paths, comfy.model_management, comfy.model_patcher and
    comfy.utils for what the nodes use, recording the calls. `fp16` / `bf16`: what should_use_fp16 /
    should_use_bf16 answer for a GPU (ComfyUI answers False for the CPU, as here)."""
    log = {"loaded": [], "bars": [], "checks": 0, "intermediate": 0, "registered": [], "dtype_asked": [],
           "memory": []}
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {k: (list(v), set()) for k, v in folders.items()}

    def add_model_folder_path(name, path, is_default=False):
        log["registered"].append((name, path))
        paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_filename_list(name):
        return sorted({p.relative_to(d).as_posix() for d in map(Path, fp.folder_names_and_paths[name][0])
                       if d.is_dir() for p in d.rglob("*") if p.is_file()})

    def get_full_path(name, filename):
        return next((str(Path(d) / filename) for d in fp.folder_names_and_paths[name][0]
                     if (Path(d) / filename).is_file()), None)

    fp.add_model_folder_path, fp.get_filename_list, fp.get_full_path = (add_model_folder_path, get_filename_list,
                                                                         get_full_path)
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])

    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")

    def intermediate_device():
        log["intermediate"] += 1
        return torch.device("cpu")

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        log["loaded"].append((list(models), force_full_load))
        log["memory"].append(memory_required)

    def throw_exception_if_processing_interrupted():
        log["checks"] += 1
        if interrupt_after is not None and log["checks"] > interrupt_after:
            raise Interrupted()

    def should_use(answer: bool, what: str):
        def ask(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
            log["dtype_asked"].append((what, device))
            return answer and device is not None and device.type != "cpu"
        return ask

    mm.should_use_fp16, mm.should_use_bf16 = should_use(fp16, "fp16"), should_use(bf16, "bf16")
    mm.intermediate_device, mm.load_models_gpu = intermediate_device, load_models_gpu
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            if not hasattr(self.model, "device") or self.model.device is None:
                self.model.device = offload_device
            self.model.device = load_device  # as ModelPatcher.load does: fails on a read-only `device` property

    mp.ModelPatcher = ModelPatcher
    cu = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0
            log["bars"].append(self)

        def update(self, value):
            self.current += value

        def update_absolute(self, value, total=None, preview=None):
            self.current = value

    cu.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, mp, cu
    return {"modules": {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm,
                        "comfy.model_patcher": mp, "comfy.utils": cu}, "log": log}


def test_inside_comfyui_folders_patchers_progress_and_cancel(models, tmp_path, monkeypatch, images):
    """extra_model_paths folders come first and stay; models get ModelPatchers that load_models_gpu is given in
    full before use; the progress bar counts batch images; Cancel stops between stages."""
    extra = tmp_path / "extra_sams"
    extra.mkdir()
    (extra / "sam_from_yaml.pth").symlink_to(models / "sams" / "sam_small.pth")
    fake = fake_comfy({"sams": [str(extra)]}, models)
    for name, module in fake["modules"].items():
        monkeypatch.setitem(sys.modules, name, module)
    log = fake["log"]
    choices = node_info("TridentLoadSAM")["input"]["required"]["model_name"][1]["options"]
    assert choices[:2] == ["sam_from_yaml.pth", "sam_small.pth"] and "sam_vit_b_01ec64.pth" in choices
    assert ("sams", str(models / "sams")) in log["registered"]
    assert fake["modules"]["folder_paths"].get_folder_paths("sams") == [str(extra), str(models / "sams")]
    (sam,) = run("TridentLoadSAM", model_name="sam_from_yaml.pth", precision="auto", allow_download=False)
    (clip,) = run("TridentLoadCLIP", model_name="clip_small.safetensors", precision="auto", allow_download=False)
    (dino,) = run("TridentLoadDINO", model_name="dino_small.pth", precision="auto", allow_download=False)
    assert sam.model.path == str(extra / "sam_from_yaml.pth")
    for handle in (sam, clip, dino):
        assert handle.patcher.model.inner is handle.model.model and handle.patcher.load_device == torch.device("cpu")

    (segs,) = run("TridentSegment", image=images, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default",
                  refine=False, sam_tiles="preset")
    assert log["loaded"][-1] == ([clip.patcher, dino.patcher, sam.patcher], True)
    assert log["memory"][-1] == 2 << 30  # the step's working memory for float32 models: 2 GiB (1 GiB in fp16)
    assert log["bars"][-1].total == 2 and log["bars"][-1].current == 2
    assert log["checks"] >= 6 and log["intermediate"] >= 2 and len(segs) == 2

    checks = log["checks"]
    (wf,) = run("TridentWindowFeatures", image=images, clip=clip, dino=dino, short_side=448, window=336, stride=224)
    assert log["loaded"][-1] == ([clip.patcher, dino.patcher], True) and log["checks"] > checks
    run("TridentSpliceAggregate", window_features=wf, sam=sam, image=images, correlation="affinity",
        paradigm="segment_then_splice", sam_tiles="1x1", cos_fac=1.2, refine_neg_cos=True)
    assert log["loaded"][-1] == ([clip.patcher], True)  # the baseline does not need SAM on the GPU

    cancel = fake_comfy({"sams": [str(extra)]}, models, interrupt_after=3)
    monkeypatch.setitem(sys.modules, "comfy.model_management", cancel["modules"]["comfy.model_management"])
    with pytest.raises(Interrupted):
        run("TridentSegment", image=images, clip=clip, dino=dino, sam=sam, classes=CLASSES, preset="default",
            refine=True, sam_tiles="preset")
    assert cancel["log"]["checks"] == 4


@pytest.mark.parametrize("fp16,bf16,want", [(True, False, torch.float16), (False, True, torch.bfloat16),
                                             (False, False, torch.float32)])
def test_auto_precision_follows_comfyuis_choice(models, monkeypatch, fp16, bf16, want):
    """precision auto takes ComfyUI's should_use_fp16 / should_use_bf16 answer for the compute device (both False
    is what --force-fp32 or an old card gives); on the CPU it stays fp32."""
    fake = fake_comfy({}, models, fp16=fp16, bf16=bf16)
    for name, module in fake["modules"].items():
        monkeypatch.setitem(sys.modules, name, module)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(fake["modules"]["comfy.model_management"], "get_torch_device", lambda: gpu)
    (sam,) = run("TridentLoadSAM", model_name="sam_small.pth", precision="auto", allow_download=False)
    assert sam.model.dtype == want and sam.model.device.type == "cpu"  # loaded on the offload device
    assert ("fp16", gpu) in fake["log"]["dtype_asked"]
    monkeypatch.setattr(fake["modules"]["comfy.model_management"], "get_torch_device", lambda: torch.device("cpu"))
    (cpu_sam,) = run("TridentLoadSAM", model_name="sam_small.pth", precision="auto", allow_download=False)
    assert cpu_sam.model.dtype == torch.float32


def test_to_device_moves_every_tensor_and_keeps_sharing(chain):
    bridge = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"]
    fm = chain["fm"][0]
    assert bridge.to_device(fm, torch.device("cpu")) is fm  # nothing to move: the same object
    moved = bridge.to_device((chain["fm"], chain["encodings"]), torch.device("meta"))
    assert moved[0][0].features.is_meta and moved[1][0].encodings[0].q.is_meta and moved[1][1].whole.v.is_meta
    assert moved[1][0].whole is moved[1][0].encodings[0] and moved[0][0].image_size == (64, 192)
    assert fm.features.device.type == "cpu"  # the original is untouched


def test_preview_keeps_no_picture_per_frame_while_it_runs(chain, images, monkeypatch):
    """Trident Preview Segmentation fills its batch frame by frame: when a frame starts, no picture of an earlier
    frame is still alive on its own (a list of frames, then stacked, would hold every picture twice)."""
    import gc

    outputs = importlib.import_module(f"{import_pack().__name__}.nodes.outputs")
    segs = chain["refined"] * 3
    frames = images.repeat(3, 1, 1, 1)
    drawn, alive = [], []

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.ndim == 3
                         and drawn and tuple(o.shape) == drawn[0]))
        colors, blended = preview(*args, **kwargs)
        drawn.append(colors.shape)
        return colors, blended

    preview = outputs.preview
    monkeypatch.setattr(outputs, "preview", counting)
    colors, _ = run("TridentPreviewSegmentation", segmentation=segs, image=frames, alpha=0.5, show_legend=True)
    assert len(alive) == 6 and colors.shape == (6, *drawn[0])
    assert max(alive) == 0
