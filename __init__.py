"""Sonic Portrait - ComfyUI entry point.

ComfyUI imports this file as a module named after its absolute path, so everything inside the pack is
reached through relative imports only. Heavy libraries (torch, diffusers, transformers) are imported by the
nodes when they run, never here, so ComfyUI starts fast.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # a small frontend fix for the audio upload widget (web/sonic_audio_upload.js)
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
