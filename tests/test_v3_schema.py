"""The V3 nodes against the classic nodes they replaced. tests/data/object_info_classic.json is /object_info of the
classic nodes as the real ComfyUI 0.8.0 served it (model folders empty), tests/data/workflows_classic/ the example
workflows as the classic release saved them. Every node keeps its id, its inputs in the same order within required
and within optional, their types (custom sockets keep their TRIDENT_* names) and widget settings, and its outputs;
so a saved workflow's widgets_values map to the same widgets (tooltips, text for people that no workflow holds,
may be reworded). A node may only gain optional inputs after the old
ones and outputs after the old ones. Also: the stand-in of the V3 API renders nodes as ComfyUI's real API does (where
a ComfyUI checkout is at hand), and an older ComfyUI gets one log line instead of the nodes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pack_import import PACK, import_pack
from test_nodes import node_classes, node_info
from test_workflows import _widget_error, is_widget, widgets_of

DATA = Path(__file__).parent / "data"
CLASSIC = json.loads((DATA / "object_info_classic.json").read_text(encoding="utf-8"))
CLASSIC_WORKFLOWS = sorted((DATA / "workflows_classic").glob("*.json"))
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", "/tmp/comfyui"))
COMFY_PY = Path(os.environ.get("COMFY_PY", "/tmp/comfy-venv/bin/python"))


def as_classic(info: dict) -> dict:
    """A V3 node's /object_info with the differences V3 legitimately makes taken back out, and nothing else:
    - a dropdown is ["COMBO", {"options": [...], "multiselect": false, ...}] where a classic one is [[...], {...}];
    - a STRING widget states "multiline": false;
    - Trident Segment's preset is a DynamicCombo: the classic choices in their order (the first is the default),
      then "custom", the only one with inputs of its own (shown while it is chosen), which the tooltip explains;
    - output_matchtypes (null), deprecated, experimental and api_node (false) are always present;
    - python_module names the folder the pack was loaded from."""
    info = json.loads(json.dumps(info))  # tuples as lists, as served
    for section in info["input"].values():
        for name, (kind, opts) in section.items():
            if kind == "COMBO":
                assert opts.pop("multiselect") is False
                section[name] = [opts.pop("options"), opts]
            elif kind == "STRING" and opts.get("multiline") is False:
                del opts["multiline"]
            elif kind == "COMFY_DYNAMICCOMBO_V3":
                *plain, custom = opts.pop("options")
                assert custom["key"] == "custom" and custom["inputs"]["required"]
                assert not any(any(o["inputs"].values()) for o in plain)
                opts["tooltip"], _ = opts["tooltip"].split(" custom: ")
                section[name] = [[o["key"] for o in plain], {"default": plain[0]["key"], **opts}]
    assert info.pop("output_matchtypes") is None
    for flag in ("deprecated", "experimental", "api_node"):
        assert info.pop(flag) is False, flag
    info.pop("python_module")
    return info


@pytest.fixture
def empty_model_folders(tmp_path, monkeypatch):
    """No model file present, as when the classic /object_info was captured: the loaders list the known files."""
    monkeypatch.setenv("TRIDENT_MODELS_DIR", str(tmp_path))


def _settings(section: dict) -> dict:
    """Inputs by name with their type and widget settings, tooltips left out."""
    return {name: [decl[0], *({k: v for k, v in opts.items() if k != "tooltip"} for opts in decl[1:])]
            for name, decl in section.items()}


# Widget settings changed on purpose since the classic release, each only widening what a saved value may be (so
# every saved workflow still loads and runs as before): Classify's short_side 0 = the one Window Features used.
CHANGED_SINCE_CLASSIC = {("TridentClassify", "optional", "short_side"): {"default": 0, "min": 0}}


def _with_changes(node_type: str, where: str, settings: dict) -> dict:
    """The classic settings with the changes listed above applied (each a lower minimum, never a higher one)."""
    out = json.loads(json.dumps(settings))
    for (node, section, name), change in CHANGED_SINCE_CLASSIC.items():
        if (node, section) == (node_type, where):
            assert change.get("min", out[name][1]["min"]) <= out[name][1]["min"]
            out[name][1].update(change)
    return out


def _prefix(old: list, new: list, what: str) -> None:
    assert new[:len(old)] == old, f"{what}: {old} must stay the start of {new}"


@pytest.mark.parametrize("node_type", sorted(CLASSIC))
def test_object_info_keeps_the_classic_declaration(node_type, empty_model_folders):
    old = {k: v for k, v in CLASSIC[node_type].items() if k != "python_module"}
    new = as_classic(node_info(node_type))
    assert _settings(new["input"]["required"]) == _settings(old["input"]["required"])
    assert list(new["input"]["required"]) == old["input_order"]["required"]
    assert all(decl[1].get("tooltip") for decl in new["input"]["required"].values())
    old_opt = _with_changes(node_type, "optional", _settings(old["input"].get("optional", {})))
    new_opt = _settings(new["input"].get("optional", {}))
    _prefix(list(old_opt.items()), list(new_opt.items()), f"{node_type} optional inputs")
    _prefix(old["input_order"].get("optional", []), new["input_order"].get("optional", []), node_type)
    for key in ("output", "output_is_list", "output_name"):
        _prefix(old[key], new[key], f"{node_type} {key}")
    assert len(new["output_tooltips"]) == len(new["output"]) and all(new["output_tooltips"])  # (text: may be reworded)
    rest = {k for k in old if k not in ("input", "input_order", "output", "output_is_list", "output_name",
                                        "output_tooltips", "description")}
    assert new["description"]
    assert {k: new[k] for k in rest} == {k: old[k] for k in rest}
    assert set(new) == set(old)


def test_every_classic_node_is_still_there():
    assert set(node_classes()) == set(CLASSIC) and len(CLASSIC) == 15


def test_as_classic_undoes_only_the_listed_differences():
    """The comparison above is not vacuous: a changed default, a reordered or retyped input is caught."""
    base = as_classic(node_info("TridentClassify"))
    changed = json.loads(json.dumps(base))
    changed["input"]["required"]["prob_thd"][1]["default"] = 0.5
    assert changed["input"]["required"] != CLASSIC["TridentClassify"]["input"]["required"]
    assert base["input"]["required"] == CLASSIC["TridentClassify"]["input"]["required"]
    reordered = dict(reversed(list(base["input"]["optional"].items())))
    assert list(reordered.items())[:4] != list(CLASSIC["TridentClassify"]["input"]["optional"].items())


def _saved_widgets(node: dict, widgets: list[tuple[str, list]]) -> dict:
    return dict(zip([name for name, _ in widgets], node["widgets_values"]))


@pytest.mark.parametrize("path", CLASSIC_WORKFLOWS, ids=lambda p: p.stem)
def test_classic_workflows_widget_values_map_to_the_same_widgets(path, empty_model_folders):
    """widgets_values of a workflow the classic release saved, read through the V3 /object_info, give each widget
    the value it had, and each value is one the V3 widget accepts."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    ours = [n for n in wf["nodes"] if n["type"] in CLASSIC]
    assert len(ours) >= 5
    for node in ours:
        classic = _saved_widgets(node, widgets_of(CLASSIC[node["type"]]))
        v3_widgets = widgets_of(node_info(node["type"]))
        assert len(node["widgets_values"]) == len(classic) <= len(v3_widgets)
        assert _saved_widgets(node, v3_widgets) == classic, node["type"]
        optional = node_info(node["type"])["input"].get("optional", {})
        assert all(name in optional for name, _ in v3_widgets[len(classic):]), "a new widget must be optional"
        for (name, (kind, opts)), value in zip(v3_widgets, node["widgets_values"]):
            if name != "model_name":  # the loaders list the files present; a missing one is downloaded
                assert _widget_error(name, kind, opts, value) is None
        links = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        declared = {n for sec in node_info(node["type"])["input"].values() for n, e in sec.items()
                    if not is_widget(e[0])}
        assert links <= declared


# The fixtures are history: the example workflows as the classic release (commit ac3d02e) shipped them and its
# /object_info; they are never regenerated, whatever the examples become.
FIXTURE_SHA256 = {
    "workflows_classic/full_graph.json": "768ea467575184601e9cf53b248150e970a0a5ab8f4e42ddfb7aede1d1bdbc01",
    "workflows_classic/inpaint_by_text.json": "962898615505920906ad78433e9ccb3b7880baba6055e13e59f83446ef712bad",
    "workflows_classic/paradigms.json": "ae1d5e2326ecb6594812471ad3e1b6df55d6afe09e50e1552c0eb86cd57e3751",
    "workflows_classic/text_to_mask.json": "550c2733dbbea740106e3a422b3add9088645a2472557dcf246c452fec799d0b",
    "object_info_classic.json": "bf114b279eb6216bf83d51e2d504343f87210ad288a6e23510ae612b6aefb898",
}


def test_classic_fixtures_are_unchanged():
    assert {p.relative_to(DATA).as_posix() for p in [*CLASSIC_WORKFLOWS, DATA / "object_info_classic.json"]} \
        == set(FIXTURE_SHA256)
    for name, digest in FIXTURE_SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


# ------------------------------------------------------------------------------------------------ validation

def test_validate_inputs_refuse_bad_text_before_anything_runs():
    """What ComfyUI asks before it queues a prompt: one line for a bad class list, preset or PAMR dilations; a
    linked input (None then) is left to the run."""
    nodes = node_classes()
    assert nodes["TridentEncodeClasses"].validate_inputs(classes="sky, dog", background="") is True
    assert "no class names given" in nodes["TridentEncodeClasses"].validate_inputs(classes=" , ", background="")
    assert "appears" in nodes["TridentEncodeClasses"].validate_inputs(classes="sky", background="sky")
    assert nodes["TridentEncodeClasses"].validate_inputs(classes=None) is True
    segment = nodes["TridentSegment"]
    assert segment.validate_inputs(classes="", preset="voc21", background="") is True  # the dataset's classes
    assert "no class names given" in segment.validate_inputs(classes="", preset="default", background="")
    assert "is not one of" in segment.validate_inputs(classes="sky", preset="nope", background="")
    assert segment.validate_inputs(classes=None, preset="default") is True
    classify = nodes["TridentClassify"]
    assert classify.validate_inputs(pamr_dilations="8, 16") is True
    assert "whole numbers from 1 to 256" in classify.validate_inputs(pamr_dilations="8;16")
    assert classify.validate_inputs(pamr_dilations="8,16", short_side=0) is True  # (Window Features' own)
    assert classify.validate_inputs(pamr_dilations="8,16", short_side=32) is True
    assert "0 (the one Window Features used) or a short side of at least 32" in classify.validate_inputs(
        pamr_dilations="8,16", short_side=16)  # (one click up from 0)


def test_loader_fingerprint_follows_the_file_on_disk(tmp_path, monkeypatch):
    """A file replaced under the same name is loaded again; an absent one has no fingerprint yet."""
    monkeypatch.setenv("TRIDENT_MODELS_DIR", str(tmp_path))
    loader = node_classes()["TridentLoadSAM"]
    assert loader.fingerprint_inputs(model_name="sam_vit_b_01ec64.pth", precision="auto") is None
    (tmp_path / "sams").mkdir()
    target = tmp_path / "sams" / "sam_vit_b_01ec64.pth"
    target.write_bytes(b"one")
    first = loader.fingerprint_inputs(model_name="sam_vit_b_01ec64.pth", precision="auto")
    assert first == loader.fingerprint_inputs(model_name="sam_vit_b_01ec64.pth", precision="fp32")
    target.write_bytes(b"other")
    os.utime(target, ns=(1, 1))
    assert loader.fingerprint_inputs(model_name="sam_vit_b_01ec64.pth", precision="auto") != first


def test_nodes_keep_no_state_on_their_classes():
    """ComfyUI runs execute on a locked copy of the class: the nodes keep nothing on it (the schema, validation and
    fingerprint leave every class as it was)."""
    before = {k: dict(vars(c)) for k, c in node_classes().items()}
    for node_type, cls in node_classes().items():
        node_info(node_type)
        if "validate_inputs" in vars(cls):
            cls.validate_inputs()
    assert {k: dict(vars(c)) for k, c in node_classes().items()} == before


# ------------------------------------------------------------------------------------------- ComfyUI's own API

def _in_python(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=PACK)


IMPORT_PACK = """
    import asyncio, importlib.util, json, logging, sys
    sys.path.insert(0, "COMFYUI")
    pack = "PACK"
    spec = importlib.util.spec_from_file_location(pack, pack + "/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[pack] = module
    spec.loader.exec_module(module)
"""
DUMP = IMPORT_PACK + """
    nodes = asyncio.run(asyncio.run(module.comfy_entrypoint()).get_node_list())
    bridge = sys.modules[pack + ".nodes.comfy_bridge"]
    print(json.dumps({"v3": bridge.COMFY_V3, "dynamic": hasattr(bridge.io, "DynamicCombo"),
                      "info": {c.GET_SCHEMA().node_id: c.GET_NODE_INFO_V1() for c in nodes}}))
"""


@pytest.mark.skipif(not (COMFYUI_DIR / "comfy_api" / "latest").is_dir() or not COMFY_PY.is_file(),
                    reason="no ComfyUI checkout (COMFYUI_DIR) and its Python (COMFY_PY) here")
def test_the_stand_in_renders_nodes_as_comfyuis_own_api(empty_model_folders):
    """The pack imported with ComfyUI's comfy_api.latest: its schemas pass ComfyUI's own checks (GET_SCHEMA), and
    ComfyUI's /object_info rendering equals the stand-in's (the loaders' file lists aside: ComfyUI's folders).
    COMFYUI_DIR may name any release's tree from 0.3.48 on (comfy_api, comfy_execution, comfy and the top-level
    modules they import)."""
    done = _in_python(COMFY_PY, DUMP.replace("COMFYUI", str(COMFYUI_DIR)).replace("PACK", str(PACK)))
    assert done.returncode == 0, done.stderr[-3000:]
    real = json.loads(done.stdout.strip().splitlines()[-1])
    assert real["v3"] is True and set(real["info"]) == set(node_classes())
    for node_type, info in real["info"].items():
        ours = json.loads(json.dumps(node_info(node_type)))
        if not real["dynamic"] and node_type == "TridentSegment":  # before 0.4.0: the classic dropdown, no 'custom'
            kind, opts = preset = info["input"]["required"]["preset"]
            classic = [opts["options"], {k: v for k, v in opts.items() if k not in ("options", "multiselect")}]
            assert kind == "COMBO" and classic == CLASSIC[node_type]["input"]["required"]["preset"]
            ours["input"]["required"]["preset"] = preset
        for entry in (info, ours):
            entry.pop("python_module")
            if "model_name" in entry["input"]["required"]:
                entry["input"]["required"]["model_name"][1].pop("options")
        assert {k: ours[k] for k in info} == info, node_type
        assert set(ours) - set(info) <= {"output_matchtypes"}  # 0.3.48 had not that field yet


def test_the_stand_in_refuses_ids_the_oldest_comfyui_refuses():
    """ComfyUI 0.3.48 refuses a schema whose output id is also an input id (Encode Classes takes and gives
    `classes`): the stand-in does too, so such a node fails here, not in a user's ComfyUI."""
    io = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"].io

    class Clash(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema("Clash", inputs=[io.String.Input("classes")], outputs=[io.String.Output("classes")])

    with pytest.raises(ValueError, match="must be unique and apart"):
        Clash.GET_NODE_INFO_V1()


def test_an_older_comfyui_gets_one_log_line_and_no_nodes(tmp_path):
    """Inside a ComfyUI without the V3 API (before 0.3.48): one clear line, no traceback, no node registered."""
    (tmp_path / "folder_paths.py").write_text("models_dir = '.'\n")
    code = ("import logging\nlogging.basicConfig(format='%(levelname)s %(message)s')\n" + textwrap.dedent(IMPORT_PACK)
            + "print(module.NODE_CLASS_MAPPINGS, hasattr(module, 'comfy_entrypoint'))\n")
    code = code.replace("COMFYUI", str(tmp_path)).replace("PACK", str(PACK))
    done = _in_python(Path(sys.executable), code)
    assert done.returncode == 0 and done.stdout.split() == ["{}", "False"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs ComfyUI 0.3.48 or newer" in lines[0] and "update ComfyUI" in lines[0]


def test_the_lowest_comfyui_is_stated_where_users_and_the_registry_read_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lowest = sys.modules[import_pack().__name__ + ".nodes.comfy_bridge"].MIN_COMFYUI
    pyproject = tomllib.loads((PACK / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == ">=" + lowest == ">=0.3.48"
    assert f"ComfyUI {lowest} or newer" in (PACK / "README.md").read_text(encoding="utf-8")
