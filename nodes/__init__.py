"""ComfyUI nodes of ComfyUI-Trident (V3 schema): thin wrappers around trident_core (see each module), registered
through `comfy_entrypoint`."""

from . import inspect_nodes, instances, loaders, outputs, stages
from .comfy_bridge import ComfyExtension, io

NODES: tuple[type[io.ComfyNode], ...] = (*loaders.NODES, *stages.NODES, *outputs.NODES, *instances.NODES,
                                         *inspect_nodes.NODES)


class TridentExtension(ComfyExtension):
    """The pack as ComfyUI's V3 loader sees it: its list of nodes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> TridentExtension:
    """What ComfyUI calls to register the pack's nodes."""
    return TridentExtension()


__all__ = ["NODES", "comfy_entrypoint"]
