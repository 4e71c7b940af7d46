"""The example workflows (UI format, as ComfyUI's frontend saves them): every node type exists, links are
consistent and typed, widget values fit the nodes' inputs, each has its thumbnail; and the ones made only of our
nodes and simple core nodes are executed here on small random-weight models (a stand-in image for LoadImage)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nodes import as_image, make_models_dir, node_classes, node_info

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
EXPECTED = {"text_to_mask", "inpaint_by_text", "full_graph", "paradigms"}
SEED_CONTROL = ("fixed", "increment", "decrement", "randomize")

# Core ComfyUI nodes the workflows use: link inputs {name: type}, output types, widget values in order (a type, or
# a tuple of allowed values). As ComfyUI 0.8.0's /object_info declares them.
CORE_NODES = {
    "LoadImage": ({}, ["IMAGE", "MASK"], [str, ("image",)]),
    "PreviewImage": ({"images": "IMAGE"}, [], []),
    "MaskPreview": ({"mask": "MASK"}, [], []),
    "MaskToImage": ({"mask": "MASK"}, ["IMAGE"], []),
    "SaveImage": ({"images": "IMAGE"}, [], [str]),
    "CheckpointLoaderSimple": ({}, ["MODEL", "CLIP", "VAE"], [str]),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["CONDITIONING"], [str]),
    "VAEEncodeForInpaint": ({"pixels": "IMAGE", "vae": "VAE", "mask": "MASK"}, ["LATENT"], [int]),
    "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
                 ["LATENT"], [int, SEED_CONTROL, int, float, str, str, float]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"], []),
    "Note": ({}, [], [str]),
}
RUNNABLE_CORE = {"LoadImage", "PreviewImage", "MaskPreview", "MaskToImage", "Note"}


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a dropdown whose choices bring their own widgets (Trident Segment's preset)


def is_widget(kind) -> bool:
    """Whether an /object_info input type is a widget (a classic combo is its list of choices, a V3 one COMBO)."""
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO)


def widgets_of(info: dict) -> list[tuple[str, list]]:
    """A node's widget inputs in the order the frontend saves their values: required ones, then optional ones."""
    spec, order = info["input"], info["input_order"]
    return [(n, spec[sec][n]) for sec in ("required", "optional") for n in order.get(sec, [])
            if is_widget(spec[sec][n][0])]


def node_spec(node_type: str) -> tuple[dict, dict, list, list]:
    """(required link inputs, optional link inputs, output types, widget checks) of a node type."""
    if node_type in node_classes():
        info = node_info(node_type)
        links = {sec: {n: e[0] for n, e in info["input"].get(sec, {}).items() if not is_widget(e[0])}
                 for sec in ("required", "optional")}
        return links["required"], links["optional"], info["output"], widgets_of(info)
    if node_type in CORE_NODES:
        inputs, outputs, widgets = CORE_NODES[node_type]
        return inputs, {}, outputs, [(f"widget {i}", (w, {})) for i, w in enumerate(widgets)]
    raise KeyError(node_type)


def _widget_error(name: str, kind, opts: dict, value) -> str | None:
    if kind == "COMBO":
        kind = opts["options"]
    elif kind == DYNAMIC_COMBO:  # a saved workflow holds the choice (none here takes one with widgets of its own)
        kind = [o["key"] for o in opts["options"] if not any(o["inputs"].values())]
    if isinstance(kind, (list, tuple)):
        return None if value in kind else f"{name}: {value!r} is not one of {list(kind)[:6]}"
    if kind in ("INT", int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and opts.get("min", value) <= value <= opts.get("max", value)
    elif kind in ("FLOAT", float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and opts.get("min", value) <= value <= opts.get("max", value)
    elif kind in ("STRING", str):
        ok = isinstance(value, str)
    elif kind == "BOOLEAN":
        ok = isinstance(value, bool)
    else:
        return f"{name}: unknown widget kind {kind!r}"
    return None if ok else f"{name}: {value!r} does not fit {kind}"


def validate(wf: dict) -> list[str]:
    """Everything wrong with a UI-format workflow, as messages (empty when it is consistent)."""
    errors = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    for nid, node in nodes.items():
        try:
            required, optional, outputs, widgets = node_spec(node["type"])
        except KeyError:
            errors.append(f"node {nid}: unknown type {node['type']}")
            continue
        where = f"node {nid} ({node['type']})"
        slots = [i for i in node.get("inputs", []) if "widget" not in i or i.get("link") is not None]
        for slot in slots:
            want = {**required, **optional}.get(slot["name"])
            if want is None:
                errors.append(f"{where}: input {slot['name']} does not exist")
            elif slot["type"] != want:
                errors.append(f"{where}: input {slot['name']} is {slot['type']}, the node takes {want}")
            if slot.get("link") is not None and slot["link"] not in links:
                errors.append(f"{where}: input {slot['name']} names missing link {slot['link']}")
        connected = {s["name"] for s in slots if s.get("link") is not None}
        errors += [f"{where}: required input {n} is not connected" for n in required if n not in connected]
        if [o["type"] for o in node.get("outputs", [])] != outputs:
            errors.append(f"{where}: outputs {[o['type'] for o in node.get('outputs', [])]} != {outputs}")
        for i, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1] != nid or links[lid][2] != i:
                    errors.append(f"{where}: output {i} lists link {lid} that does not start there")
        values = node.get("widgets_values", [])
        if len(values) != len(widgets):
            errors.append(f"{where}: {len(values)} widget values for {len(widgets)} widgets")
        for (name, (kind, opts)), value in zip(widgets, values):
            if (msg := _widget_error(name, kind, opts, value)) is not None:
                errors.append(f"{where}: {msg}")
    for lid, origin, oslot, target, tslot, ltype in links.values():
        if origin not in nodes or target not in nodes:
            errors.append(f"link {lid}: joins missing node {origin} -> {target}")
            continue
        outs, ins = nodes[origin].get("outputs", []), nodes[target].get("inputs", [])
        if oslot >= len(outs) or lid not in (outs[oslot].get("links") or []):
            errors.append(f"link {lid}: not listed on node {origin}'s output {oslot}")
        elif outs[oslot]["type"] != ltype:
            errors.append(f"link {lid}: typed {ltype}, its origin gives {outs[oslot]['type']}")
        if tslot >= len(ins) or ins[tslot].get("link") != lid:
            errors.append(f"link {lid}: not the link of node {target}'s input {tslot}")
        elif ins[tslot]["type"] != ltype:
            errors.append(f"link {lid}: typed {ltype}, node {target}'s input takes {ins[tslot]['type']}")
    if wf.get("last_link_id", 0) < max(links, default=0) or wf.get("last_node_id", 0) < max(nodes, default=0):
        errors.append("last_node_id / last_link_id are below the ids in use")
    return errors


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_four_workflows_and_their_thumbnails_exist():
    from PIL import Image

    assert {p.stem for p in WORKFLOWS} == EXPECTED
    for p in WORKFLOWS:
        thumb = p.with_suffix(".jpg")
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 200
        assert thumb.stat().st_size < 300_000


# What the frontend's missing-models dialog reads off a loader node: properties.models = [{name, url, directory}]
# (its zod schema zModelFile: name, url (a URL), directory; hash and hash_type optional).
LOADER_FOLDERS = {"TridentLoadCLIP": "open_clip", "TridentLoadDINO": "dino", "TridentLoadSAM": "sams",
                  "CheckpointLoaderSimple": "checkpoints"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_model_loaders_carry_the_frontends_model_metadata(path):
    """Someone who opens a shared workflow without the files is offered the download: each loader names its
    selected file, the official URL the pack itself downloads it from, and ComfyUI's folder for it."""
    from urllib.parse import urlparse

    from trident_core.download import MODELS

    loaders = [n for n in load(path)["nodes"] if n["type"] in LOADER_FOLDERS]
    assert loaders
    for node in loaders:
        (entry,) = node["properties"]["models"]
        assert set(entry) == {"name", "url", "directory"} and entry["name"] == node["widgets_values"][0]
        assert entry["directory"] == LOADER_FOLDERS[node["type"]]
        url = urlparse(entry["url"])
        assert url.scheme == "https" and url.netloc
        known = [m for m in MODELS.values() if m.filename == entry["name"]]
        if node["type"] != "CheckpointLoaderSimple":
            assert known and entry["url"] in known[0].urls
        else:
            assert url.netloc == "huggingface.co" and url.path.endswith("/" + entry["name"])


def test_workflows_live_where_comfyui_looks_for_templates():
    """ComfyUI serves a pack's templates from example_workflows/ (it only logs a hint for workflows/)."""
    root = Path(__file__).resolve().parents[1]
    assert WORKFLOWS and all(p.parent.name == "example_workflows" for p in WORKFLOWS)
    assert not (root / "workflows").exists()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_consistent(path):
    wf = load(path)
    assert wf["version"] == 0.4 and validate(wf) == []
    images = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    assert images == ["example.png"]  # ships in ComfyUI's input folder
    ours = {n["type"] for n in wf["nodes"]} & set(node_classes())
    assert ours and all(n["mode"] == 0 for n in wf["nodes"])


TITLE_HEIGHT = 30  # the frontends draw a node's title bar above its `pos`


def overlaps(wf: dict) -> list[tuple[int, int]]:
    """Pairs of nodes whose boxes (title bar included, at their saved sizes) intersect."""
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]}
    ids = sorted(boxes)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2] and boxes[a][1] < boxes[b][3]
            and boxes[b][1] < boxes[a][3]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap(path):
    """Saved sizes are at least what both frontends (1.35.9, 1.58.1) draw the nodes at, and no two nodes share
    room, so nothing covers anything when the workflow opens."""
    assert overlaps(load(path)) == []
    touching = copy.deepcopy(load(path))
    touching["nodes"][1]["pos"] = list(touching["nodes"][0]["pos"])
    assert overlaps(touching)


def test_validator_catches_broken_workflows():
    wf = load(next(p for p in WORKFLOWS if p.stem == "full_graph"))
    seg = next(n for n in wf["nodes"] if n["type"] == "TridentSamRefine")
    cases = []
    bad = copy.deepcopy(wf)
    next(n for n in bad["nodes"] if n["id"] == seg["id"])["widgets_values"].pop()
    cases.append((bad, "widget values for"))
    bad = copy.deepcopy(wf)
    next(n for n in bad["nodes"] if n["id"] == seg["id"])["widgets_values"][4] = "sideways"
    cases.append((bad, "is not one of"))
    bad = copy.deepcopy(wf)
    bad["links"][0][5] = "MASK"
    cases.append((bad, "typed MASK"))
    bad = copy.deepcopy(wf)
    bad["nodes"][0]["type"] = "TridentNoSuchNode"
    cases.append((bad, "unknown type"))
    bad = copy.deepcopy(wf)
    target = next(n for n in bad["nodes"] if n["type"] == "TridentClassify")
    target["inputs"][0]["link"] = None
    cases.append((bad, "required input feature_map is not connected"))
    for broken, message in cases:
        assert any(message in e for e in validate(broken)), message


# ------------------------------------------------------------------------------------------------- execution

def execute(wf: dict, image: torch.Tensor) -> dict[int, tuple]:
    """Run a workflow's nodes in dependency order as ComfyUI would (widget values by position, links by slot);
    LoadImage gives `image`, preview nodes return what they were given."""
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] != "Note"}
    links = {lk[0]: lk for lk in wf["links"]}
    ours = node_classes()
    results: dict[int, tuple] = {}

    def value(nid: int) -> tuple:
        if nid in results:
            return results[nid]
        node = nodes[nid]
        kwargs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, oslot, *_ = links[slot["link"]]
                kwargs[slot["name"]] = value(origin)[oslot]
        kind = node["type"]
        if kind in ours:
            names = [n for n, _ in node_spec(kind)[3]]
            kwargs.update(zip(names, node["widgets_values"]))
            results[nid] = tuple(ours[kind].execute(**kwargs).args)
        elif kind == "LoadImage":
            results[nid] = (image, torch.zeros(image.shape[:3]))
        elif kind == "MaskToImage":
            results[nid] = (kwargs["mask"][..., None].expand(-1, -1, -1, 3),)
        else:  # PreviewImage, MaskPreview: output nodes
            results[nid] = tuple(kwargs.values())
        return results[nid]

    for nid in nodes:
        value(nid)
    return results


@pytest.fixture(scope="module")
def default_models(small_ckpts, tmp_path_factory):
    """The small checkpoints under the default file names the workflows select."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIDENT_MODELS_DIR", str(make_models_dir(tmp_path_factory.mktemp("wf_models"), small_ckpts)))
        mp.setenv("TRIDENT_NO_DOWNLOAD", "1")
        yield


RUNNABLE = [p for p in WORKFLOWS if {n["type"] for n in load(p)["nodes"]}
            <= set(node_classes()) | RUNNABLE_CORE]


def test_runnable_workflows_are_all_but_inpainting():
    assert {p.stem for p in RUNNABLE} == EXPECTED - {"inpaint_by_text"}


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_workflow_runs_on_small_models(path, default_models, photo):
    image = as_image(np.ascontiguousarray(photo[::8, ::6]))  # 64 x 86
    wf = load(path)
    results = execute(wf, image)
    previews = [n for n in wf["nodes"] if n["type"] in ("PreviewImage", "MaskPreview")]
    assert previews
    for node in previews:
        (shown,) = results[node["id"]]
        if node["type"] == "MaskPreview":  # one mask per image, or per object after Trident Instances
            assert shown.shape[1:] == (64, 86) and shown.shape[0] >= 1
            assert set(shown.unique().tolist()) <= {0.0, 1.0}
        else:
            assert shown.shape[0] == 1 and shown.shape[2] == 86 and shown.shape[3] == 3 and shown.shape[1] >= 64
            assert 0 <= shown.min() and shown.max() <= 1
