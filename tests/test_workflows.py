"""The example workflows: each UI graph matches its API copy, and every API workflow runs on the tiny checkpoint.

The runner executes an API-format prompt in dependency order through the pack's NODE_CLASS_MAPPINGS, with the
native LoadAudio (a synthetic 48 kHz stereo tone), SaveAudio and PreviewAudio (capture) stubbed. The examples
carry the real model names and official settings; TINY_PROFILE swaps in the tiny checkpoint, 3-4 steps and
2-second sources so each workflow runs in seconds on a CPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, VOCAB
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
UI_DIR = REPO / "example_workflows"
API_DIR = REPO / "tests" / "api_workflows"
NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
# The examples are named for people (ComfyUI's template browser shows the file name as the title, and a <name>.jpg
# beside it as the thumbnail); each names its API copy in extra.acestep_api_copy.
UI_FILES = {json.loads(p.read_text())["extra"]["acestep_api_copy"]: p for p in sorted(UI_DIR.glob("*.json"))}

SOURCE_RATE = 48000
SOURCE_SECONDS = 2.0
EDITOR_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Native nodes: widget names in widgets_values order ("" = an editor-only value such as LoadAudio's player).
NATIVE_WIDGETS = {
    "LoadAudio": ["audio", "", ""], "SaveAudio": ["filename_prefix"], "PreviewAudio": [],
    "EmptyAceStepLatentAudio": ["seconds", "batch_size"],
}
# (class_type, input) -> value used when running on the tiny checkpoint.
TINY_PROFILE = {
    ("EmptyAceStepLatentAudio", "seconds"): 2.0,
    ("AceStepLoader", "checkpoint"): "acestep-v1-tiny",
    ("AceStepLoader", "repo_id"): "",
    ("AceStepLoader", "device"): "cpu",
    ("AceStepLoraLoader", "lora_name"): "acestep-v1-tiny-lora",
    ("AceStepEmptyLatent", "seconds"): 2.0,
    ("AceStepSampler", "steps"): 3,
    ("AceStepFlowEdit", "steps"): 4,
    ("AceStepRepaintRegion", "start_seconds"): 0.5,
    ("AceStepRepaintRegion", "end_seconds"): 1.5,
    ("AceStepExtend", "left_seconds"): 0.5,
    ("AceStepExtend", "right_seconds"): 1.0,
}
SAMPLES_PER_FRAME = 4096
# ACE-Step 1.5 examples (acestep15_*): the tiny 1.5 checkpoint (tests/tiny15.py) keeps the real folder names, turbo
# keeps its fixed 8 steps; base tasks run 2 steps.
V15_TASKS = ("text2music", "cover", "repaint", "lego", "extract", "complete")
TINY_PROFILE_15 = {
    **{k: v for k, v in TINY_PROFILE.items()
       if k not in {("AceStepLoader", "checkpoint"), ("AceStepSampler", "steps")}},
    ("AceStep15EmptyLatent", "seconds"): 2.0,
    ("AceStep15Lego", "steps"): 2,
    ("AceStep15Extract", "steps"): 2,
    ("AceStep15Complete", "steps"): 2,
}


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    """Model folders and lyric vocabulary of the tiny test checkpoint."""
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


def widget_names(class_type: str) -> list[str | None]:
    """widgets_values layout of a node: widget input names, None after a seed's control_after_generate."""
    if class_type in NATIVE_WIDGETS:
        return NATIVE_WIDGETS[class_type]
    names: list[str | None] = []
    spec = NODES[class_type].INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, options) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
                if options.get("control_after_generate"):
                    names.append(None)
    return names


def optional_widgets(class_type: str) -> set[str | None]:
    """The optional widget inputs of a pack node (None stands for a seed's control_after_generate slot)."""
    if class_type in NATIVE_WIDGETS:
        return set()
    optional = NODES[class_type].INPUT_TYPES().get("optional", {})
    return {None} | {name for name, (kind, _) in optional.items() if isinstance(kind, list) or kind in WIDGET_TYPES}


def ui_to_api(ui: dict) -> dict:
    """The API prompt a UI graph describes (simple graphs: no reroutes, groups nodes or subgraphs)."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in EDITOR_ONLY or node.get("mode", 0) in (2, 4):
            continue
        names = widget_names(node["type"])
        values = node.get("widgets_values", [])
        # a graph saved before optional widgets were appended to a node (e.g. Text Encode's 1.5 fields) stores
        # fewer values; the editor gives the missing trailing ones their defaults
        missing = names[len(values):]
        assert len(values) <= len(names) and set(missing) <= optional_widgets(node["type"]), (
            f"node {node['id']} {node['type']}: widgets_values {values} vs {names}")
        inputs = {name: value for name, value in zip(names, values) if name}
        for slot, entry in enumerate(node.get("inputs", [])):
            if entry.get("link") is None:
                continue
            _, source, source_slot, target, target_slot, kind = links[entry["link"]]
            assert (target, target_slot) == (node["id"], slot), f"link {entry['link']} does not end at this input"
            assert kind == entry["type"], f"link {entry['link']} carries {kind}, input {entry['name']} wants {entry['type']}"
            inputs[entry["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load(folder: Path, name: str) -> dict:
    """An API copy by name, or (folder UI_DIR) the example whose API copy has that name."""
    path = UI_FILES[name] if folder == UI_DIR else folder / f"{name}.json"
    return json.loads(path.read_text())


def test_every_example_has_an_api_copy():
    assert NAMES, f"no API workflows in {API_DIR}"
    assert sorted(UI_FILES) == NAMES and len(UI_FILES) == len(list(UI_DIR.glob("*.json")))
    for path in UI_FILES.values():
        assert path.stem.startswith(("ACE-Step - ", "ACE-Step 1.5 - ")) and "_" not in path.stem, (
            f"{path.name}: give it a title, not an id")
    for task in ("text2music", "retake", "repaint", "extend", "flow_edit", "audio2audio", "lora"):
        assert f"acestep_{task}" in NAMES
    for task in V15_TASKS:  # ACE-Step 1.5: one example per task
        assert f"acestep15_{task}" in NAMES and UI_FILES[f"acestep15_{task}"].stem.startswith("ACE-Step 1.5 - ")


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_matches_api_copy(name):
    ui, api = load(UI_DIR, name), load(API_DIR, name)
    assert ui["version"] == 0.4 and isinstance(ui["links"], list)
    assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for node in ui["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= node.keys(), node["id"]
        for slot, out in enumerate(node["outputs"]):
            for link_id in out["links"] or []:
                link = next(link for link in ui["links"] if link[0] == link_id)
                assert link[1:3] == [node["id"], slot] and link[5] == out["type"]
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui) == expected


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_known_nodes_and_valid_values(name):
    for node_id, node in load(API_DIR, name).items():
        kind = node["class_type"]
        if kind in NATIVE_WIDGETS:
            continue
        spec = NODES[kind].INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(spec.get("required", {})) <= set(node["inputs"]), f"{node_id} {kind} misses required inputs"
        for key, value in node["inputs"].items():
            assert key in declared, f"{node_id} {kind} has unknown input {key}"
            choices, options = declared[key]
            if isinstance(value, list):
                continue
            on_disk = ("checkpoint", "lora_name", "control_name", "params_file")  # lists of files on disk
            if isinstance(choices, list) and key not in on_disk:
                assert value in choices, f"{node_id} {kind}.{key}={value!r} not in {choices}"
            if "min" in options:
                assert options["min"] <= value <= options["max"], f"{node_id} {kind}.{key}={value} out of range"


# ---------------------------------------------------------------------------------------------------------------
# running


def source_tone(seconds: float = SOURCE_SECONDS, rate: int = SOURCE_RATE) -> dict:
    """Stereo test audio: two tones with a little noise, like a loaded file ([1, 2, N] at 48 kHz)."""
    t = torch.arange(int(seconds * rate)) / rate
    generator = torch.Generator().manual_seed(0)
    left = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.02 * torch.randn(t.shape, generator=generator)
    right = 0.3 * torch.sin(2 * math.pi * 330 * t) + 0.02 * torch.randn(t.shape, generator=generator)
    return {"waveform": torch.stack([left, right])[None].float(), "sample_rate": rate}


class Run:
    """The outputs of every node of one executed prompt, and the audio its output nodes received."""

    def __init__(self, prompt: dict, profile: dict | None = None):
        self.prompt = prompt
        self.profile = TINY_PROFILE if profile is None else profile
        self.outputs: dict[str, tuple] = {}
        self.saved: dict[str, dict] = {}

    def value(self, ref):
        if isinstance(ref, list) and len(ref) == 2 and isinstance(ref[0], str):
            return self.outputs[ref[0]][ref[1]]
        return ref

    def execute(self, node_id: str) -> None:
        if node_id in self.outputs:
            return
        node = self.prompt[node_id]
        for ref in node["inputs"].values():
            if isinstance(ref, list) and len(ref) == 2 and isinstance(ref[0], str):
                self.execute(ref[0])
        kind = node["class_type"]
        inputs = {k: self.value(v) for k, v in node["inputs"].items()}
        inputs = {k: self.profile.get((kind, k), v) for k, v in inputs.items()}
        if kind == "LoadAudio":
            self.outputs[node_id] = (source_tone(),)
        elif kind == "EmptyAceStepLatentAudio":
            frames = int(inputs["seconds"] * 44100 / 512 / 8)
            self.outputs[node_id] = ({"samples": torch.zeros(inputs["batch_size"], 8, 16, frames), "type": "audio"},)
        elif kind in ("SaveAudio", "PreviewAudio"):
            self.saved[node_id] = inputs["audio"]
            self.outputs[node_id] = ()
        else:
            cls = NODES[kind]
            result = getattr(cls(), cls.FUNCTION)(**inputs)
            self.outputs[node_id] = result["result"] if isinstance(result, dict) else result

    def run(self) -> "Run":
        for node_id in self.prompt:
            self.execute(node_id)
        return self


def producer(prompt: dict, node_id: str, name: str) -> str:
    return prompt[node_id]["inputs"][name][0]


# These need a trained StemGen file and output audio directly; tests/test_stemgen.py runs them with one it trains.
RUN_ELSEWHERE = {"acestep_stemgen", "acestep_singing2accompaniment", "acestep_app_params"}  # test_app runs the last


@pytest.mark.parametrize("name", [n for n in NAMES if n not in RUN_ELSEWHERE and not n.startswith("acestep15_")])
def test_workflow_runs_and_makes_audio(name):
    prompt = load(API_DIR, name)
    run = Run(prompt).run()
    assert run.saved, "the workflow has no audio output node"
    for node_id, audio in run.saved.items():
        decoder = producer(prompt, node_id, "audio")
        assert prompt[decoder]["class_type"] == "AceStepDecode"
        rate = int(prompt[decoder]["inputs"]["sample_rate"])
        frames = run.value(prompt[decoder]["inputs"]["latent"])["samples"].shape[-1]
        waveform = audio["waveform"]
        assert audio["sample_rate"] == rate
        assert waveform.dtype == torch.float32 and waveform.device.type == "cpu"
        assert waveform.shape[:2] == (1, 2)
        assert waveform.shape[-1] == math.ceil(frames * SAMPLES_PER_FRAME * rate / 44100)
        assert torch.isfinite(waveform).all()
        assert waveform.pow(2).mean().sqrt() > 1e-4, "silent output"
        assert_length_fits_task(prompt, run, decoder, frames)


def assert_length_fits_task(prompt: dict, run: Run, decoder: str, frames: int) -> None:
    """The decoded latent has the length the task promises."""
    node_id = producer(prompt, decoder, "latent")
    node = prompt[node_id]
    source_frames = math.ceil(SOURCE_SECONDS * 44100 / SAMPLES_PER_FRAME)
    kind = node["class_type"]
    if kind == "AceStepFlowEdit":
        assert frames == source_frames
        return
    assert kind == "AceStepSampler"
    marker = prompt[producer(prompt, node_id, "latent")]
    task = marker["class_type"]
    if task in ("AceStepEmptyLatent", "EmptyAceStepLatentAudio"):
        assert frames == int(TINY_PROFILE[(task, "seconds")] * 44100 / SAMPLES_PER_FRAME)
    elif task == "AceStepExtend":
        extra = sum(int(TINY_PROFILE[(task, k)] * 44100 / SAMPLES_PER_FRAME) for k in ("left_seconds", "right_seconds"))
        assert frames == source_frames + extra
    else:
        assert frames == source_frames
    if task == "AceStepRepaintRegion":
        marked = run.value(node["inputs"]["latent"])
        kept = marked["noise_mask"][:, 0] == 0
        out = run.outputs[node_id][0]["samples"]
        assert torch.equal(out[..., kept[0]], marked["samples"][..., kept[0]]), "repaint changed the kept part"
        assert not torch.equal(out[..., ~kept[0]], marked["samples"][..., ~kept[0]]), "repaint left the region as it was"


# ---------------------------------------------------------------------------------------------------------------
# ACE-Step 1.5


@pytest.fixture(scope="module")
def tiny15_dir(tmp_path_factory):
    from tiny15 import write_tiny15

    return write_tiny15(tmp_path_factory.mktemp("models15"))


@pytest.mark.parametrize("name", [f"acestep15_{task}" for task in V15_TASKS])
def test_15_workflow_runs_and_makes_audio(name, tiny15_dir, monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(tiny15_dir))
    prompt = load(API_DIR, name)
    run = Run(prompt, TINY_PROFILE_15).run()
    assert run.saved, "the workflow has no audio output node"
    for node_id, audio in run.saved.items():
        decoder = producer(prompt, node_id, "audio")
        assert prompt[decoder]["class_type"] == "AceStepDecode"
        latent = run.value(prompt[decoder]["inputs"]["latent"])["samples"]
        assert latent.ndim == 3, "a 1.5 latent is [batch, channels, frames]"
        rate = int(prompt[decoder]["inputs"]["sample_rate"])
        waveform = audio["waveform"]
        assert audio["sample_rate"] == rate == 48000 and waveform.dtype == torch.float32
        assert waveform.shape == (1, 2, latent.shape[-1] * 1920) and torch.isfinite(waveform).all()
        assert waveform.pow(2).mean().sqrt() > 1e-4, "silent output"
        new_song = name.endswith("text2music")
        seconds = TINY_PROFILE_15[("AceStep15EmptyLatent", "seconds")] if new_song else SOURCE_SECONDS
        assert latent.shape[-1] == round(seconds * 25), "the result has the length the task promises"
