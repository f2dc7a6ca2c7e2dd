"""ACE-Step v1 music generation for ComfyUI: registration only.

The nodes are V1 classes in NODE_CLASS_MAPPINGS (they load on every ComfyUI release and import without ComfyUI);
WEB_DIRECTORY serves the editor extensions (waveform region picker, lyrics helper). Importing this package defines
names and nothing else: no device is chosen, no model folder is touched, nothing is downloaded.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
