"""ComfyUI node classes of the ACE-Step pack, and their registration tables.

These are V1 node classes (INPUT_TYPES / RETURN_TYPES / FUNCTION), registered through NODE_CLASS_MAPPINGS: that
path loads on every ComfyUI release (V3's comfy_api exists only from 0.3.48) and the classes import and run
without ComfyUI at all, which is how the tests call them. ComfyUI itself is reached only through `bridge`.
"""
from .codec import AceStepDecode, AceStepEncode
from .download import AceStepDownload
from .guard import guard
from .latents import AceStepAudio2Audio, AceStepEmptyLatent, AceStepExtend, AceStepRepaintRegion
from .loaders import AceStepLoader, AceStepLoraLoader
from .longform import AceStepLongForm
from .params import AceStepGenrePreset, AceStepLoadParams, AceStepSaveAudio
from .preview import AceStepPreviewImage
from .sampling import AceStepFlowEdit, AceStepSampler, AceStepSamplerOptions
from .stemgen import AceStepSinging2Accompaniment, AceStepStemGen, AceStepStemGenLoader
from .text import AceStepTextEncode
from .timing import AceStepLyricTiming
from .v15 import AceStep15Complete, AceStep15Cover, AceStep15EmptyLatent, AceStep15Extract, AceStep15Lego

NODE_DISPLAY_NAME_MAPPINGS = {
    "AceStepLoader": "ACE-Step Loader",
    "AceStepLoraLoader": "ACE-Step LoRA Loader",
    "AceStepTextEncode": "ACE-Step Text Encode",
    "AceStepEmptyLatent": "ACE-Step Empty Latent",
    "AceStepSampler": "ACE-Step Sampler",
    "AceStepSamplerOptions": "ACE-Step Sampler Options",
    "AceStepRepaintRegion": "ACE-Step Repaint Region",
    "AceStepExtend": "ACE-Step Extend",
    "AceStepAudio2Audio": "ACE-Step Audio2Audio",
    "AceStepFlowEdit": "ACE-Step Flow Edit",
    "AceStepEncode": "ACE-Step Encode Audio",
    "AceStepDecode": "ACE-Step Decode",
    "AceStepPreviewImage": "ACE-Step Spectrogram Preview",
    "AceStepDownload": "ACE-Step Download",
    "AceStepLyricTiming": "ACE-Step Lyric Timing",
    "AceStepLongForm": "ACE-Step Long Form",
    "AceStepStemGenLoader": "ACE-Step StemGen Loader",
    "AceStepStemGen": "ACE-Step StemGen",
    "AceStepSinging2Accompaniment": "ACE-Step Singing2Accompaniment",
    "AceStepLoadParams": "ACE-Step Load Params",
    "AceStepSaveAudio": "ACE-Step Save Audio",
    "AceStepGenrePreset": "ACE-Step Genre Preset",
    "AceStep15EmptyLatent": "ACE-Step 1.5 Empty Latent",
    "AceStep15Cover": "ACE-Step 1.5 Cover",
    "AceStep15Lego": "ACE-Step 1.5 Lego (add a track)",
    "AceStep15Extract": "ACE-Step 1.5 Extract (a track)",
    "AceStep15Complete": "ACE-Step 1.5 Complete",
}

NODE_CLASS_MAPPINGS = {
    cls.__name__: guard(cls)  # widget values checked against INPUT_TYPES before the node runs (guard.py)
    for cls in (
        AceStepLoader, AceStepLoraLoader, AceStepTextEncode, AceStepEmptyLatent, AceStepSampler,
        AceStepSamplerOptions, AceStepRepaintRegion, AceStepExtend, AceStepAudio2Audio, AceStepFlowEdit,
        AceStepEncode, AceStepDecode, AceStepPreviewImage, AceStepDownload,
        AceStepLyricTiming, AceStepLongForm, AceStepStemGenLoader, AceStepStemGen, AceStepSinging2Accompaniment,
        AceStepLoadParams, AceStepSaveAudio, AceStepGenrePreset,
        AceStep15EmptyLatent, AceStep15Cover, AceStep15Lego, AceStep15Extract, AceStep15Complete,
    )
}
