"""ComfyUI nodes: thin adapters between ComfyUI types and the `sonic` engine (added with the node-pack issue)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
