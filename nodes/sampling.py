"""Sampling nodes: the sampler (text2music, retake, repaint, extend, audio2audio), its advanced options, flow edit."""
from __future__ import annotations

import functools

import torch

from ..acestep_core import fast, tasks
from ..acestep_core.noise import MAX_SEED
from ..acestep_core.params import EDIT_TYPES, app_default, edit_range
from ..acestep_core.cancel import checked_calls
from ..acestep_core.sampling.denoiser import CFG_TYPES, GuidanceConfig
from ..acestep_core.validation import MemorySettings, call_explaining_oom
from . import bridge, timing, v15, wire
from . import params as app_nodes
from .model import ModelHandle, on_device, transformer_for
from .wire import CATEGORY, COND, MODEL, OPTIONS

# the official app's UI values where they differ from the pipeline's (acestep_core.params.APP_DEFAULTS)
GUIDANCE = GuidanceConfig(use_erg_lyric=app_default("use_erg_lyric"))
DEFAULTS = tasks.SamplerOptions(guidance=GUIDANCE)
EDIT_SCHEDULERS = ("euler", "pingpong")


def _seed_input(tooltip: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": tooltip})


SAMPLER_TOOLTIPS = {
    "seed": "Seed of the base noise (item i of a batch uses seed + i), as the official app.",
    "steps": "Sampling steps (official default 60).",
    "scheduler": "euler (default), heun (2 model calls per step) or pingpong (stochastic). Repaint and extend always "
                 "step with Euler, as the official code.",
    "cfg_type": "Guidance: apg (official default), plain cfg, or cfg_star (CFG-Zero*).",
    "guidance_scale": "Guidance strength (official 15; 0 or 1 switch guidance off).",
    "omega_scale": "Granularity scale of the Euler/Heun step (official 10; 0 = plain step).",
}


def sampler_widgets(**tooltips: str) -> dict:
    """The sampler's seed, steps, scheduler, cfg_type, guidance_scale and omega_scale widgets (in that order, with
    the sampler's defaults and bounds) for every node that samples; `tooltips` replace the sampler's own."""
    tip = {**SAMPLER_TOOLTIPS, **tooltips}
    return {
        "seed": _seed_input(tip["seed"]),
        "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 1000, "tooltip": tip["steps"]}),
        "scheduler": (list(tasks.SCHEDULERS), {"default": DEFAULTS.scheduler, "tooltip": tip["scheduler"]}),
        "cfg_type": (list(CFG_TYPES), {"default": GUIDANCE.cfg_type, "tooltip": tip["cfg_type"]}),
        "guidance_scale": ("FLOAT", {"default": GUIDANCE.guidance_scale, "min": 0.0, "max": 200.0, "step": 0.1,
                                     "tooltip": tip["guidance_scale"]}),
        "omega_scale": ("FLOAT", {"default": GUIDANCE.omega_scale, "min": -100.0, "max": 100.0, "step": 0.1,
                                  "tooltip": tip["omega_scale"]}),
    }


class AceStepSampler:
    DESCRIPTION = (
        "Generates music with ACE-Step. The latent decides the task: an empty latent makes a new song (a retake "
        "when retake_variance > 0); a latent from Repaint Region, Extend or Audio2Audio runs that edit."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The generated song's latent; decode it with ACE-Step Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (with its LoRAs)."}),
                "conditioning": (COND, {"tooltip": "Tags and lyrics from ACE-Step Text Encode."}),
                "latent": ("LATENT", {
                    "tooltip": "Empty latent (new song) or a latent marked by Repaint Region / Extend / Audio2Audio.",
                }),
                **sampler_widgets(),
            },
            "optional": {
                "options": (OPTIONS, {"tooltip": "Advanced settings from ACE-Step Sampler Options (else defaults)."}),
                "retake_variance": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Text to music only: > 0 makes a variation (retake) of the song of this seed, "
                               "mixing in noise of retake_seed (official 0.2-0.5); 0 = off.",
                }),
                "retake_seed": _seed_input(
                    "Seed of the second noise: retake variations, the repainted region and the extension."
                ),
                "collect_lyric_timing": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Collect the lyric cross-attention while sampling, for ACE-Step Lyric Timing (the "
                               "song is unchanged; needs compile off).",
                }),
                "seeds": ("STRING", {
                    "default": "",
                    "tooltip": "One seed per batch item, as the official app's manual seeds ('1,2,3,4'; a shorter "
                               "list repeats its last seed); empty = seed + i.",
                }),
            },
        }

    def sample(self, model: ModelHandle, conditioning, latent: dict, seed: int, steps: int, scheduler: str,
               cfg_type: str, guidance_scale: float, omega_scale: float, options=None,
               retake_variance: float = 0.0, retake_seed: int = 0, collect_lyric_timing: bool = False, seeds: str = ""):
        if v15.is_handle(model) or v15.is_cond(conditioning) or v15.is_latent(latent):  # ACE-Step 1.5
            return v15.sample(model, conditioning, latent, seed, steps, scheduler, cfg_type, guidance_scale,
                              omega_scale, options, retake_variance, retake_seed, collect_lyric_timing, seeds)
        source = wire.samples_of(latent, "latent")
        cond = wire.check_conditioning(conditioning, "conditioning")
        mark = wire.mark_of(latent) or {"task": "text2music", "retake_variance": float(retake_variance)}
        task = mark["task"]
        if retake_variance and task != "text2music":
            raise ValueError(
                f"retake_variance only applies to a new song; this latent is marked for {task} "
                "(set its variance on that node and retake_variance to 0)"
            )
        if options is not None and not isinstance(options, tasks.SamplerOptions):
            raise ValueError("options must come from the ACE-Step Sampler Options node")
        settings = tasks.with_options(
            options or DEFAULTS, steps=steps, scheduler=scheduler, cfg_type=cfg_type,
            guidance_scale=guidance_scale, omega_scale=omega_scale,
        )
        transformer = transformer_for(model)
        noise = wire.noise_for(transformer, seed, source.shape[0], retake_seed=retake_seed, latent=latent,
                               seeds=app_nodes.listed_seeds(seeds, source.shape[0]))
        progress = bridge.Progress(steps)
        frames = source.shape[-1] + int(mark.get("left_frames", 0)) + int(mark.get("right_frames", 0))
        memory = _memory_settings("sampling", transformer, frames, source.shape[0], settings.speed.batch_branches)
        run = functools.partial(tasks.run_task, task, transformer, cond, source, mark, batch_size=source.shape[0],
                                options=settings, noise=noise, callback=progress.step_callback())
        cancel = None if settings.speed.compile else wire.cancel_check()  # compiled blocks run without hooks
        # Cancel checked before every layer of a step
        with torch.no_grad(), on_device(model, transformer), checked_calls(cancel, transformer):
            out, collected = timing.sample_collecting(collect_lyric_timing, transformer, cond,
                                                      functools.partial(call_explaining_oom, run, memory))
        drop = (("noise_mask",) if out.shape[-1] != source.shape[-1] else ()) + (timing.TIMING_KEY,)
        result = wire.with_samples(latent, out, drop=drop)
        result[app_nodes.PARAMS_KEY] = app_nodes.sampler_record(cond, source, settings, noise.seeds,
                                                                noise.retake_seeds, mark, retake_variance)
        if collected is not None:
            result[timing.TIMING_KEY] = collected
        return (result,)


def _memory_settings(stage: str, transformer, frames: int, batch: int, batch_branches: bool) -> MemorySettings:
    """What an out-of-memory message needs to suggest settings that would fit."""
    p = next(transformer.parameters())
    return MemorySettings(stage, wire.frames_to_seconds(frames), batch, p.dtype, fast.compute_device(transformer),
                          batch_branches)


class AceStepSamplerOptions:
    DESCRIPTION = "Advanced ACE-Step sampler settings (defaults = the official pipeline's) for the ACE-Step Sampler."
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (OPTIONS,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("Sampler settings; connect to the options input of ACE-Step Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        g = GUIDANCE
        return {
            "required": {
                "guidance_interval": ("FLOAT", {
                    "default": g.guidance_interval, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Share of the steps (centred) that use guidance (official 0.5).",
                }),
                "guidance_interval_decay": ("FLOAT", {
                    "default": g.guidance_interval_decay, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Lower the guidance scale linearly to min_guidance_scale across the interval "
                               "(0 = constant).",
                }),
                "min_guidance_scale": ("FLOAT", {
                    "default": g.min_guidance_scale, "min": 0.0, "max": 200.0, "step": 0.1,
                    "tooltip": "Guidance scale at the end of the interval when decay > 0.",
                }),
                "guidance_scale_text": ("FLOAT", {
                    "default": g.guidance_scale_text, "min": 0.0, "max": 200.0, "step": 0.1,
                    "tooltip": "Double-condition guidance: text scale (active when both this and the lyric scale "
                               "are > 1; replaces cfg_type).",
                }),
                "guidance_scale_lyric": ("FLOAT", {
                    "default": g.guidance_scale_lyric, "min": 0.0, "max": 200.0, "step": 0.1,
                    "tooltip": "Double-condition guidance: lyric scale (active when both scales are > 1).",
                }),
                "use_erg_tag": ("BOOLEAN", {
                    "default": g.use_erg_tag,
                    "tooltip": "ERG on the tags: the unconditional branch sees temperature-scaled tag states.",
                }),
                "use_erg_lyric": ("BOOLEAN", {
                    "default": g.use_erg_lyric,
                    "tooltip": "ERG on the lyrics (off as the official app's UI; the pipeline's default is on).",
                }),
                "use_erg_diffusion": ("BOOLEAN", {
                    "default": g.use_erg_diffusion,
                    "tooltip": "ERG in the diffusion transformer for the unconditional branch.",
                }),
                "zero_steps": ("INT", {
                    "default": g.zero_steps, "min": 0, "max": 1000,
                    "tooltip": "cfg_star only: first steps whose guided velocity is zeroed.",
                }),
                "use_zero_init": ("BOOLEAN", {
                    "default": g.use_zero_init,
                    "tooltip": "cfg_star only: zero the velocity during the first zero_steps steps.",
                }),
                "oss_steps": ("STRING", {
                    "default": ",".join(str(s) for s in DEFAULTS.oss_steps),
                    "tooltip": "Optimal-step schedule, e.g. '16, 29, 52, 60' (replaces steps); empty = none. "
                               "Euler/PingPong text to music only.",
                }),
                "shift": ("FLOAT", {
                    "default": DEFAULTS.shift, "min": 0.01, "max": 100.0, "step": 0.01,
                    "tooltip": "Schedule shift (official 3.0).",
                }),
                "batch_branches": ("BOOLEAN", {
                    "default": DEFAULTS.speed.batch_branches,
                    "tooltip": "Fast path: run the guidance branches in one batched model call (more memory, "
                               "tiny numerical differences from the official separate calls).",
                }),
            },
        }

    def make(self, guidance_interval: float, guidance_interval_decay: float, min_guidance_scale: float,
             guidance_scale_text: float, guidance_scale_lyric: float, use_erg_tag: bool, use_erg_lyric: bool,
             use_erg_diffusion: bool, zero_steps: int, use_zero_init: bool, oss_steps: str, shift: float,
             batch_branches: bool):
        guidance = GuidanceConfig(
            guidance_interval=float(guidance_interval), guidance_interval_decay=float(guidance_interval_decay),
            min_guidance_scale=float(min_guidance_scale), guidance_scale_text=float(guidance_scale_text),
            guidance_scale_lyric=float(guidance_scale_lyric), use_erg_tag=bool(use_erg_tag),
            use_erg_lyric=bool(use_erg_lyric), use_erg_diffusion=bool(use_erg_diffusion), zero_steps=int(zero_steps),
            use_zero_init=bool(use_zero_init),
        )
        return (tasks.SamplerOptions(guidance=guidance, oss_steps=oss_steps, shift=float(shift),
                                     speed=tasks.SpeedOptions(batch_branches=bool(batch_branches))),)


class AceStepFlowEdit:
    DESCRIPTION = (
        "Edits a song with FlowEdit: moves it from the source tags/lyrics to the target ones (e.g. new lyrics on "
        "the same music). n_min/n_max choose which part of the schedule is edited."
    )
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The edited song's latent; decode it with ACE-Step Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (with its LoRAs)."}),
                "source_conditioning": (COND, {"tooltip": "Tags and lyrics that describe the source song."}),
                "target_conditioning": (COND, {"tooltip": "Tags and lyrics the edited song should have."}),
                "latent": ("LATENT", {"tooltip": "The source song, e.g. from ACE-Step Encode Audio."}),
                "seed": _seed_input("Seed of the edit noise (official: the retake seeds)."),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 1000,
                                  "tooltip": "Schedule steps (official 60)."}),
                "guidance_scale": ("FLOAT", {
                    "default": GUIDANCE.guidance_scale, "min": 0.0, "max": 200.0, "step": 0.1,
                    "tooltip": "APG guidance strength on every step (official 15; 0 or 1 = off).",
                }),
                "scheduler": (list(EDIT_SCHEDULERS), {
                    "default": "euler",
                    "tooltip": "euler (official) or pingpong (stochastic steps after n_max).",
                }),
                "n_min": ("FLOAT", {
                    "default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Edit starts at this share of the schedule (official UI: 0.6 lyrics only, 0.2 remix).",
                }),
                "n_max": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Edit ends here; later steps sample the target normally (official UI: 1.0 lyrics "
                               "only, 0.4 remix).",
                }),
                "n_avg": ("INT", {
                    "default": 1, "min": 1, "max": 16,
                    "tooltip": "Noise draws averaged per edit step (more = smoother, slower).",
                }),
            },
            "optional": {
                "collect_lyric_timing": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Collect the target lyrics' cross-attention while editing, for ACE-Step Lyric "
                               "Timing (the result is unchanged; needs compile off).",
                }),
                "edit_type": (["custom", *EDIT_TYPES], {
                    "default": "custom",
                    "tooltip": "As the official app's Edit Type: only_lyrics sets n_min 0.6 / n_max 1.0 (same "
                               "music, new words), remix 0.2 / 0.4 (melody and genre may change); custom uses the "
                               "n_min / n_max widgets.",
                }),
            },
        }

    def edit(self, model: ModelHandle, source_conditioning, target_conditioning, latent: dict, seed: int,
             steps: int, guidance_scale: float, scheduler: str, n_min: float, n_max: float, n_avg: int,
             collect_lyric_timing: bool = False, edit_type: str = "custom"):
        source = wire.samples_of(latent, "latent")
        n_min, n_max = edit_range(edit_type, n_min, n_max)
        src = wire.check_conditioning(source_conditioning, "source_conditioning")
        tgt = wire.check_conditioning(target_conditioning, "target_conditioning")
        if scheduler not in EDIT_SCHEDULERS:
            raise ValueError(f"scheduler must be one of {EDIT_SCHEDULERS} for flow edit, got {scheduler!r:.200}")
        edit = tasks.EditOptions(n_min=float(n_min), n_max=float(n_max), n_avg=int(n_avg))
        options = tasks.SamplerOptions(steps=int(steps), scheduler=scheduler,
                                       guidance=GuidanceConfig(guidance_scale=float(guidance_scale)))
        transformer = transformer_for(model)
        noise = wire.noise_for(transformer, seed, source.shape[0], retake_seed=seed, latent=latent)
        progress = bridge.Progress(steps)
        memory = _memory_settings("editing", transformer, source.shape[-1], source.shape[0], options.speed.batch_branches)
        run = functools.partial(tasks.flow_edit, transformer, src, tgt, source, edit=edit, batch_size=source.shape[0],
                                options=options, noise=noise, callback=progress.step_callback())
        # Cancel checked before every layer
        with torch.no_grad(), on_device(model, transformer), checked_calls(wire.cancel_check(), transformer):
            out, collected = timing.sample_collecting(collect_lyric_timing, transformer, tgt,
                                                      functools.partial(call_explaining_oom, run, memory))
        result = wire.with_samples(latent, out, drop=(timing.TIMING_KEY,))
        result[app_nodes.PARAMS_KEY] = app_nodes.edit_record(src, tgt, source, options, noise.retake_seeds, edit)
        if collected is not None:
            result[timing.TIMING_KEY] = collected
        return (result,)
