"""ACE-Step v1 in plain PyTorch: models, loading, conditioning, sampling and tasks.

Importing this package does nothing but define names: no device is picked, nothing is downloaded.
It never imports ComfyUI.
"""
__version__ = "0.1.0"
