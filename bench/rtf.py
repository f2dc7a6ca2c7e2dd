"""Text-to-music speed: per-phase times, real-time factor and peak GPU memory, eager vs fast path (bench/README.md).

CPU, the tiny checkpoint (what CI runs):
    python -m bench.rtf --checkpoint tests/data/tiny/acestep-v1-tiny --seconds 2 --steps 2 --compare
GPU, the real 3.5B configuration with random weights (speed does not depend on the values; nothing downloaded):
    python -m bench.rtf --random-weights --seconds 60 240 --steps 27 60 --compare

Each setting (duration x steps x batch) runs the official default guidance (APG, scale 15, interval 0.5, ERG
tag/lyric/diffusion, Euler, omega 10) on a 40-token prompt and 468 lyric tokens (the lengths of the official H100
baseline) given as token ids. Phases: text encoding (UMT5, plain and ERG-tag), diffusion (condition encoder and
sampling loop), DCAE decode, vocoder, the rest of decoding (48 kHz resampling), and in low-VRAM mode the copies
of components onto the device. RTF = seconds of audio produced (batch x duration) / seconds of compute.
The JSON goes to bench/results/<device>-<timestamp>.json; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import UMT5Config, UMT5EncoderModel

from acestep_core import audio as audio_io
from acestep_core import fast, tasks
from acestep_core.conditioning import ERG_TAU, Conditioning
from acestep_core.loading import load_acestep, parameters_on_meta
from acestep_core.models.dcae import DCAE, DCAEConfig
from acestep_core.models.transformer import AceStepTransformer, TransformerConfig
from acestep_core.models.vocoder import Vocoder, VocoderConfig
from acestep_core.noise import SeededNoise
from acestep_core.text import EOS_ID, ERG_TAG_LAYERS, scaled_queries, umt5_config_from_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 40
LYRIC_TOKENS = 468
OUTPUT_RATE = 48000
"""The official pipeline's output rate (latents2audio resamples to 48 kHz)."""
UMT5_BASE_SHAPES = {
    "shared.weight": (256384, 768),
    "encoder.block.0.layer.0.SelfAttention.q.weight": (768, 768),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 12),
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (2048, 768),
    **{f"encoder.block.{i}.layer.0.layer_norm.weight": (768,) for i in range(12)},
}
"""The umt5-base encoder's sizes (spec/real-keys/umt5_base_encoder.json), enough to derive its config."""
FAST_FLAGS = {
    "batch_branches": "run the guidance branches as one batched model call",
    "reuse_cross_kv": "compute the cross-attention keys/values once per generation",
    "linear_ff": "run the feed-forward 1x1 convolutions as matrix products",
    "skip_full_masks": "skip mask arithmetic when every frame and token is valid",
}


@dataclass
class Models:
    """The four networks of a generation, on one device in one dtype."""

    transformer: AceStepTransformer
    dcae: DCAE
    vocoder: Vocoder
    text_model: nn.Module  # transformers UMT5EncoderModel
    device: torch.device
    dtype: torch.dtype
    source: str


@dataclass(frozen=True)
class Setting:
    """One benchmarked generation size."""

    seconds: float
    steps: int
    batch: int


def load_checkpoint_models(path: str | Path, device: torch.device, dtype: torch.dtype) -> Models:
    """Every component of a checkpoint (folder or single file) through the pack's loader."""
    model = load_acestep(path, dtype=dtype, device=device)
    return Models(model.transformer, model.dcae, model.vocoder, model.text_encoder.model, device, dtype,
                  f"checkpoint {path}")


def random_models(
    device: torch.device,
    dtype: torch.dtype,
    *,
    transformer: TransformerConfig = TransformerConfig(),
    dcae: DCAEConfig = DCAEConfig(),
    vocoder: VocoderConfig = VocoderConfig(),
    text: UMT5Config | None = None,
    seed: int = 0,
) -> Models:
    """The real configurations (defaults) built on meta and filled with random values directly on `device`."""
    text = text or umt5_config_from_checkpoint(None, UMT5_BASE_SHAPES)
    with parameters_on_meta():
        modules = AceStepTransformer(transformer), DCAE(dcae), Vocoder(vocoder), UMT5EncoderModel(text)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    t, d, v, u = (materialize_random(m, device, dtype, generator) for m in modules)
    size = "real" if transformer == TransformerConfig() else "reduced"
    return Models(t, d, v, u, device, dtype, f"random weights, {size} configuration")


def materialize_random(module: nn.Module, device: torch.device, dtype: torch.dtype,
                       generator: torch.Generator) -> nn.Module:
    """Replace every meta parameter by a random tensor made on `device` (tied parameters stay tied).

    Weights get N(0, 1/fan_in), biases 0, norm scales and weight-norm magnitudes 1: values that keep
    activations finite through the 24 blocks, the DCAE and the vocoder.
    """
    made: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                tensor = torch.empty(param.shape, device=device, dtype=dtype)
                if name.endswith("bias"):
                    tensor.zero_()
                elif tensor.ndim <= 1 or name == "weight_g":
                    tensor.fill_(1.0)
                else:
                    tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=generator)
                made[id(param)] = nn.Parameter(tensor, requires_grad=False)
            owner._parameters[name] = made[id(param)]
    return module.to(device).eval()


@dataclass
class TokenInputs:
    """Prompt and lyric token ids [1, L] with all-ones masks (the tokenizers run on the CPU and are not timed)."""

    text_ids: Tensor
    text_mask: Tensor
    lyric_ids: Tensor
    lyric_mask: Tensor


def make_inputs(models: Models, prompt_tokens: int, lyric_tokens: int, seed: int) -> TokenInputs:
    """Random prompt ids (ending with the end token) and lyric ids inside both vocabularies."""
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(2, models.text_model.config.vocab_size, (1, prompt_tokens), generator=g)
    text_ids[0, -1] = EOS_ID
    lyric_ids = torch.randint(1, models.transformer.config.lyric_encoder_vocab_size, (1, lyric_tokens), generator=g)
    return TokenInputs(text_ids, torch.ones_like(text_ids), lyric_ids, torch.ones_like(lyric_ids))


def encode_text(models: Models, inputs: TokenInputs, erg_tag: bool) -> Conditioning:
    """UMT5 states of the prompt, plus the ERG-tag tempered states, as `encode_conditioning` makes them (design §4)."""
    device = next(models.text_model.parameters()).device
    ids, mask = inputs.text_ids.to(device), inputs.text_mask.to(device)
    states = models.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    tempered = None
    if erg_tag:
        with scaled_queries(models.text_model, ERG_TAG_LAYERS, ERG_TAU):
            tempered = models.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return Conditioning("", "", states, mask, inputs.lyric_ids.to(device), inputs.lyric_mask.to(device), tempered)


class Recorder:
    """Named time spans: CUDA events on a GPU (read after one synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list[tuple]] = {}

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the body as one span of `name`."""
        start = self._mark()
        try:
            yield
        finally:
            self.spans.setdefault(name, []).append((start, self._mark()))

    def count(self, name: str) -> int:
        """How many spans of `name` have started and ended."""
        return len(self.spans.get(name, ()))

    def seconds(self, name: str) -> list[float]:
        """Durations of every span of `name`."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in self.spans.get(name, ())]
        return [b - a for a, b in self.spans.get(name, ())]


@contextmanager
def timed_calls(recorder: Recorder, name: str, obj: object, method: str) -> Iterator[None]:
    """Record every call of `obj.method` as a span of `name` while inside."""
    original = getattr(obj, method)

    def timed(*args, **kwargs):
        with recorder.span(name):
            return original(*args, **kwargs)

    setattr(obj, method, timed)
    try:
        yield
    finally:
        delattr(obj, method)


@contextmanager
def phase(recorder: Recorder, name: str, offloader: fast.Offloader | None, *modules: nn.Module) -> Iterator[None]:
    """A timed phase; in low-VRAM mode its modules are first copied to the device (timed as "offload")."""
    with ExitStack() as stack:
        if offloader is not None:
            with recorder.span("offload"):
                stack.enter_context(offloader.use(*modules))
        with recorder.span(name):
            yield


def run_once(models: Models, inputs: TokenInputs, setting: Setting, options: tasks.SamplerOptions, *,
             fast_decode: bool, offloader: fast.Offloader | None, seed: int) -> dict:
    """One timed text2music generation: phase seconds, model calls per step, peak memory, latents and audio."""
    rec = Recorder(models.device)
    calls_per_step: list[int] = []

    def on_step(step: int, total: int, x: Tensor) -> None:
        calls_per_step.append(rec.count("transformer_call") - sum(calls_per_step))

    frames = tasks.frames_for_seconds(setting.seconds)
    seeds = [seed + i for i in range(setting.batch)]
    decode = fast.decode_with_fallback if fast_decode else audio_io.decode_latents
    if rec.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu_start = time.process_time()
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(timed_calls(rec, "transformer_call", models.transformer, "decode"))
        stack.enter_context(timed_calls(rec, "dcae", models.dcae, "decode"))
        stack.enter_context(timed_calls(rec, "vocoder", models.vocoder, "decode"))
        with rec.span("total"):
            with phase(rec, "text_encoding", offloader, models.text_model):
                cond = encode_text(models, inputs, options.guidance.use_erg_tag)
            noise = SeededNoise.from_seeds(seeds, setting.batch, retake_seed=seeds, device=models.device,
                                           dtype=models.dtype)
            with phase(rec, "diffusion", offloader, models.transformer):
                latents = tasks.text2music(models.transformer, cond, frames, batch_size=setting.batch,
                                           options=options, noise=noise, callback=on_step)
            with phase(rec, "decode", offloader, models.dcae, models.vocoder):
                audio = decode(models.dcae, models.vocoder, latents, sample_rate=OUTPUT_RATE)
    calls = rec.seconds("transformer_call")
    cpu_s = time.process_time() - cpu_start
    times = {name: sum(rec.seconds(name)) for name in ("text_encoding", "diffusion", "dcae", "vocoder", "decode",
                                                       "offload", "total")}
    return {
        "phases_s": {
            "text_encoding": times["text_encoding"],
            "diffusion": times["diffusion"],
            "dcae_decode": times["dcae"],
            "vocoder": times["vocoder"],
            "decode_other": times["decode"] - times["dcae"] - times["vocoder"],
            "offload": times["offload"],
        },
        "total_s": times["total"],
        "process_cpu_s": cpu_s,
        "model_calls": len(calls),
        "calls_per_step": calls_per_step,
        "model_call_ms_mean": 1000 * statistics.fmean(calls) if calls else None,
        "model_call_ms_min": 1000 * min(calls) if calls else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if rec.cuda else None,
        "latents": latents.float().cpu(),
        "audio": audio.float().cpu(),
    }


def bench_setting(models: Models, inputs: TokenInputs, setting: Setting, variant: str, options: tasks.SamplerOptions,
                  *, offloader: fast.Offloader | None, warmup: int, repeats: int, seed: int) -> tuple[dict, dict]:
    """`warmup` untimed then `repeats` timed runs of one variant; (record with medians, last run)."""
    run = dict(fast_decode=variant == "fast", offloader=offloader, seed=seed)
    for _ in range(warmup):
        run_once(models, inputs, setting, options, **run)
    runs = [run_once(models, inputs, setting, options, **run) for _ in range(repeats)]
    total = statistics.median(r["total_s"] for r in runs)
    record = {
        "variant": variant,
        **asdict(setting),
        "latent_frames": tasks.frames_for_seconds(setting.seconds),
        "options": {name: getattr(options, name) for name in (*FAST_FLAGS, "compile")},
        "low_vram": offloader is not None,
        "phases_s": {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]},
        "total_s": total,
        "rtf": setting.batch * setting.seconds / total,
        "process_cpu_s": statistics.median(r["process_cpu_s"] for r in runs),
        "model_calls": runs[-1]["model_calls"],
        "calls_per_step": runs[-1]["calls_per_step"],
        "model_call_ms_mean": statistics.median(r["model_call_ms_mean"] for r in runs),
        "model_call_ms_min": min(r["model_call_ms_min"] for r in runs),
        "peak_gpu_memory_gib": runs[-1]["peak_gpu_memory_gib"],
        "runs_total_s": [r["total_s"] for r in runs],
    }
    return record, runs[-1]


def compare(setting: Setting, eager: tuple[dict, dict], fast_run: tuple[dict, dict]) -> dict:
    """Speed ratio and largest differences of the fast path against the eager one on the same inputs."""
    (e_rec, e_run), (f_rec, f_run) = eager, fast_run
    return {
        **asdict(setting),
        "eager_total_s": e_rec["total_s"],
        "fast_total_s": f_rec["total_s"],
        "speedup": e_rec["total_s"] / f_rec["total_s"],
        "diffusion_speedup": e_rec["phases_s"]["diffusion"] / f_rec["phases_s"]["diffusion"],
        "process_cpu_speedup": e_rec["process_cpu_s"] / f_rec["process_cpu_s"],
        "max_abs_diff_latents": (e_run["latents"] - f_run["latents"]).abs().max().item(),
        "max_abs_latents": e_run["latents"].abs().max().item(),
        "max_abs_diff_audio": (e_run["audio"] - f_run["audio"]).abs().max().item(),
        "max_abs_audio": e_run["audio"].abs().max().item(),
    }


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.rtf", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder or single file (e.g. the tiny one on the CPU)")
    source.add_argument("--random-weights", action="store_true",
                        help="real 3.5B configuration with random weights made on the device (no download)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on a GPU (as the official pipeline), float32 on the CPU")
    p.add_argument("--seconds", type=_positive(float), nargs="+", default=[60.0, 240.0])
    p.add_argument("--steps", type=_positive(int), nargs="+", default=[27, 60])
    p.add_argument("--batch", type=_positive(int), nargs="+", default=[1])
    p.add_argument("--compare", action="store_true", help="run the eager path too and compare (speed, max diff)")
    p.add_argument("--eager", action="store_true", help="run only the eager path (every fast option off)")
    p.add_argument("--low-vram", "--cpu-offload", dest="low_vram", action="store_true",
                   help="keep components on the CPU and move each to the device only for its phase")
    for name, text in FAST_FLAGS.items():
        p.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                       help=f"fast path: do not {text}")
    p.add_argument("--compile", "--torch-compile", dest="compile", action="store_true",
                   help="fast path: torch.compile the transformer blocks")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="GPU: keep fp32 matmuls in full precision (the official pipeline enables TF32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed setting")
    p.add_argument("--repeats", type=_positive(int), default=2, help="timed runs per setting (median reported)")
    p.add_argument("--prompt-tokens", type=_positive(int), default=PROMPT_TOKENS)
    p.add_argument("--lyric-tokens", type=_positive(int), default=LYRIC_TOKENS)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=_positive(int), help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = p.parse_args(argv)
    if args.compare and args.eager:
        p.error("--compare already runs the eager path; drop --eager")
    if any(s > 240 for s in args.seconds):
        p.error("--seconds must be at most 240 (the model's longest window)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_report(report: dict, folder: Path) -> Path:
    """bench/results/<device>-<UTC timestamp>.json."""
    meta = report["meta"]
    slug = "cpu" if meta["device"] == "cpu" else re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}-{meta['timestamp']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


HEADER = (f"{'variant':8} {'audio':>6} {'steps':>5} {'batch':>5} {'calls':>5} {'text s':>7} {'diff s':>8} "
          f"{'dcae s':>7} {'voc s':>7} {'other s':>7} {'offl s':>7} {'total s':>8} {'RTF':>8} {'peak GiB':>8}")


def row(r: dict) -> str:
    """One result as a table row under HEADER."""
    p = r["phases_s"]
    peak = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
    return (f"{r['variant']:8} {r['seconds']:>5g}s {r['steps']:>5} {r['batch']:>5} {r['model_calls']:>5} "
            f"{p['text_encoding']:>7.3f} {p['diffusion']:>8.3f} {p['dcae_decode']:>7.3f} {p['vocoder']:>7.3f} "
            f"{p['decode_other']:>7.3f} {p['offload']:>7.3f} {r['total_s']:>8.3f} {r['rtf']:>7.1f}x {peak:>8}")


def comparison_line(c: dict) -> str:
    """One eager-vs-fast comparison in words."""
    return (f"{c['seconds']:g} s, {c['steps']} steps, batch {c['batch']}: fast {c['speedup']:.2f}x eager "
            f"(diffusion {c['diffusion_speedup']:.2f}x, process CPU time {c['process_cpu_speedup']:.2f}x); "
            f"max |diff| latents {c['max_abs_diff_latents']:.2e} (of {c['max_abs_latents']:.2f}), "
            f"audio {c['max_abs_diff_audio']:.2e} (of {c['max_abs_audio']:.2f})")


def table(report: dict) -> str:
    """The results and comparisons as a plain-text table."""
    return "\n".join([HEADER, *map(row, report["results"]), *map(comparison_line, report["comparisons"])])


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON, print the table; returns the report (with its path under meta.path)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    started = time.perf_counter()
    models = (random_models(device, dtype, seed=args.seed) if args.random_weights
              else load_checkpoint_models(args.checkpoint, device, dtype))
    build_s = time.perf_counter() - started
    offloader = None
    if args.low_vram:
        offloader = fast.Offloader(device)
        offloader.park(models.text_model, models.transformer, models.dcae, models.vocoder)
    inputs = make_inputs(models, args.prompt_tokens, args.lyric_tokens, args.seed)
    report = {"meta": _meta(args, argv, models, build_s), "results": [], "comparisons": []}
    report["meta"]["settings_planned"] = len(args.seconds) * len(args.steps) * len(args.batch)
    variants = ["eager", "fast"] if args.compare else ["eager"] if args.eager else ["fast"]
    print(f"{models.source} on {report['meta']['device_name']} ({report['meta']['dtype']}), built in {build_s:.1f} s",
          flush=True)
    print(HEADER, flush=True)
    for seconds in args.seconds:
        for steps in args.steps:
            for batch in args.batch:
                setting = Setting(seconds, steps, batch)
                fast_options = tasks.SamplerOptions(steps=steps, speed=tasks.SpeedOptions(
                    compile=args.compile, **{name: getattr(args, name) for name in FAST_FLAGS}))
                runs = {}
                for variant in variants:
                    options = replace(fast_options, speed=tasks.EAGER) if variant == "eager" else fast_options
                    runs[variant] = bench_setting(models, inputs, setting, variant, options, offloader=offloader,
                                                  warmup=args.warmup, repeats=args.repeats, seed=args.seed)
                    report["results"].append(runs[variant][0])
                    print(row(runs[variant][0]), flush=True)
                if args.compare:
                    report["comparisons"].append(compare(setting, runs["eager"], runs["fast"]))
                    print(comparison_line(report["comparisons"][-1]), flush=True)
                path = write_report(report, args.out)  # after every setting: a run cut short keeps what it measured
    report["meta"]["path"] = str(path)
    print(table(report))
    print(f"wrote {path}")
    return report


def _meta(args: argparse.Namespace, argv: Sequence[str] | None, models: Models, build_s: float) -> dict:
    """What was run, where and how (the JSON's "meta")."""
    return {
        "what": "text2music, official default guidance, pack's eager and fast paths",
        "command": " ".join(["python -m bench.rtf", *(argv if argv is not None else sys.argv[1:])]),
        "timestamp": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "commit": _commit(),
        "source": models.source,
        "device": models.device.type,
        "device_name": device_name(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "tf32_matmul": bool(models.device.type == "cuda" and args.tf32),
        "guidance": asdict(tasks.SamplerOptions().guidance),
        "scheduler": "euler",
        "prompt_tokens": args.prompt_tokens,
        "lyric_tokens": args.lyric_tokens,
        "output_sample_rate": OUTPUT_RATE,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "low_vram": args.low_vram,
        "build_s": build_s,
        "rtf_definition": "batch x audio seconds / total seconds (text encoding + diffusion + decode)",
    }


if __name__ == "__main__":
    main()
