"""A stand-in for the few parts of ComfyUI's V3 node API (`comfy_api.latest`: `io`, `ComfyExtension`) that the nodes
use, so they import and run without ComfyUI (tests, scripts). Same names and arguments; a node's
`GET_NODE_INFO_V1()` gives what ComfyUI's /object_info serves for it. Inside ComfyUI the real API is used."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

# The option names ComfyUI serves for a widget argument where they differ from the argument's name.
_SERVED_AS = {"display_mode": "display", "dynamic_prompts": "dynamicPrompts", "force_input": "forceInput",
              "widget_type": "widgetType", "raw_link": "rawLink"}
# Options ComfyUI always serves for a widget type, even when not given.
_ALWAYS = {"STRING": {"multiline": False}, "COMBO": {"multiselect": False}}


@dataclass
class Input:
    """One declared input: its id, socket type, whether it is optional, and its options (tooltip, default, ...)."""

    id: str
    io_type: str
    optional: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def served(self) -> tuple[str, dict[str, Any]]:
        """(type, options) as /object_info lists the input."""
        opts = _ALWAYS.get(self.io_type, {}) | {_SERVED_AS.get(k, k): v for k, v in self.options.items()}
        return self.io_type, {k: v for k, v in opts.items() if v is not None}


@dataclass
class Output:
    """One declared output: its id (the name shown on the socket), socket type and tooltip."""

    id: str | None
    io_type: str
    display_name: str | None = None
    tooltip: str | None = None
    is_output_list: bool = False


def _input_dict(inputs: list[Input]) -> dict[str, dict]:
    """Inputs as /object_info groups them: {"required": {id: (type, options)}, "optional": {...}}."""
    grouped: dict[str, dict] = {"required": {}}
    for i in inputs:
        grouped.setdefault("optional" if i.optional else "required", {})[i.id] = i.served()
    return grouped


@dataclass
class DynamicOption:
    """One choice of a DynamicCombo and the inputs shown while it is chosen."""

    key: str
    inputs: list[Input] = field(default_factory=list)


@dataclass
class DynamicComboInput(Input):
    """A dropdown whose choices each bring their own inputs (served as COMFY_DYNAMICCOMBO_V3)."""

    choices: list[DynamicOption] = field(default_factory=list)

    def served(self) -> tuple[str, dict[str, Any]]:
        opts = {k: v for k, v in self.options.items() if v is not None}
        return self.io_type, opts | {"options": [{"key": c.key, "inputs": _input_dict(c.inputs)}
                                                for c in self.choices]}


class _DynamicCombo:
    """io.DynamicCombo: `Option(key, inputs)` and `Input(id, options=[...])`."""

    Option = DynamicOption

    @staticmethod
    def Input(id: str, options: list[DynamicOption], *, optional: bool = False,  # noqa: N802 (ComfyUI's name)
              **extra: Any) -> DynamicComboInput:
        return DynamicComboInput(id, "COMFY_DYNAMICCOMBO_V3", optional, extra, options)


class _Socket:
    """A socket type: `Input(...)` and `Output(...)` declare an input or output of that type, as `io.Int`,
    `io.Image` or `io.Custom("X")` do."""

    def __init__(self, io_type: str) -> None:
        self.io_type = io_type

    def Input(self, id: str, *, optional: bool = False, **options: Any) -> Input:  # noqa: N802 (ComfyUI's name)
        return Input(id, self.io_type, optional, options)

    def Output(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,  # noqa: N802
               is_output_list: bool = False) -> Output:
        return Output(id, self.io_type, display_name or id, tooltip, is_output_list)


@dataclass
class Schema:
    """A node's declaration (the fields of ComfyUI's io.Schema that the nodes set)."""

    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False


class NodeOutput:
    """A node's result: the outputs in order (`args`)."""

    def __init__(self, *args: Any, ui: Any = None) -> None:
        self.args = args
        self.ui = ui

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    """Base of a V3 node: classmethods `define_schema` and `execute` (optionally `validate_inputs`,
    `fingerprint_inputs`)."""

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        """The node as /object_info serves it, after the checks the oldest supported ComfyUI makes: input ids and
        output ids each unique, and no id both an input's and an output's."""
        schema = cls.define_schema()
        in_ids, out_ids = [i.id for i in schema.inputs], [o.id for o in schema.outputs]
        if len(set(in_ids)) != len(in_ids) or len(set(out_ids)) != len(out_ids) or set(in_ids) & set(out_ids):
            raise ValueError(f"{schema.node_id}: input ids {in_ids} and output ids {out_ids} must be unique and "
                             "apart")
        inputs = _input_dict(schema.inputs)
        outs = schema.outputs
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                "output": [o.io_type for o in outs], "output_is_list": [o.is_output_list for o in outs],
                "output_name": [o.display_name or o.io_type for o in outs],
                "output_tooltips": [o.tooltip or None for o in outs], "output_matchtypes": None,
                "name": schema.node_id, "display_name": schema.display_name, "description": schema.description,
                "python_module": "nodes", "category": schema.category, "output_node": schema.is_output_node,
                "deprecated": schema.is_deprecated, "experimental": schema.is_experimental,
                "api_node": schema.is_api_node}


class ComfyExtension(ABC):
    """What a pack's `comfy_entrypoint` returns: the list of its nodes."""

    async def on_load(self) -> None:
        return None

    @abstractmethod
    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError


def Custom(io_type: str) -> _Socket:  # noqa: N802 (ComfyUI's name)
    """A custom socket type, e.g. Custom("TRIDENT_CLIP")."""
    return _Socket(io_type)


io = SimpleNamespace(
    ComfyNode=ComfyNode, Schema=Schema, NodeOutput=NodeOutput, Custom=Custom,
    Boolean=_Socket("BOOLEAN"), Int=_Socket("INT"), Float=_Socket("FLOAT"), String=_Socket("STRING"),
    Combo=_Socket("COMBO"), Image=_Socket("IMAGE"), Mask=_Socket("MASK"), DynamicCombo=_DynamicCombo,
)
