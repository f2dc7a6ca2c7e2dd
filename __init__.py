"""ACE-Step v1 music generation for ComfyUI: registration only.

The nodes are V1 classes in NODE_CLASS_MAPPINGS (they load on every ComfyUI release and import without ComfyUI);
WEB_DIRECTORY serves the editor extensions (waveform region picker, lyrics helper). Importing this package defines
names and nothing else: no device is chosen, no model folder is touched, nothing is downloaded.
"""
if __package__:  # imported as a package: ComfyUI (under its path name) or tests/pack_loader.py
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # a bare module (pytest collecting the repo root as a package of an invalid name): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
