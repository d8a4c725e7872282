"""Sonic Portrait - ComfyUI entry point.

ComfyUI imports this file as a module named after its absolute path, so everything inside the pack is
reached through relative imports only. Heavy libraries (torch, diffusers, transformers) are imported by the
nodes when they run, never here, so ComfyUI starts fast.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module, outside any package: pytest does that to a checkout whose folder name is not
    # an identifier (`sonic-portrait`). There is no pack to register then; ComfyUI always gives a package.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"  # frontend extensions: the audio upload widget, the lip-sync result on its node
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
