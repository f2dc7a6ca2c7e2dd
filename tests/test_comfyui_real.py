"""The pack inside a real ComfyUI server: import, /object_info, and every API workflow run over HTTP + websocket.

Runs when COMFYUI_DIR points to a ComfyUI checkout (see docs/comfyui.md); skipped without it, except when
ACESTEP_REQUIRE_COMFYUI=1 (.ci/run sets it whenever ComfyUI is beside the clone, as in CI), where it fails. The server is started headless on
CPU, on 127.0.0.1 and a free port, with a temporary base directory holding the pack (symlinked into
custom_nodes), the tiny checkpoint (models/ace_step), the tiny LoRA and untrained StemGen files (models/loras), a
generated source.wav (input/) and a test-only memory probe node (tests/comfyui_helpers.py). COMFYUI_PYTHON names the interpreter that has ComfyUI's and the pack's requirements (default: this
one); with ACESTEP_TEST_PIP_INSTALL=1 the pack's requirements.txt is pip-installed into it first, otherwise they
are assumed installed. Each workflow is the example's API copy shrunk by the headless runner's TINY_PROFILE,
queued with POST /prompt (non-empty node_errors fail), followed on /ws to its end, and each saved or previewed
audio file is read back with soundfile and checked (rate, length, channels, finite, not silent, not clipped).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile

from comfyui_helpers import (COMFYUI_DIR, comfyui_mark, free, install_probe, pack_loaded, probe, require_comfyui,
                             wait_for, wait_for_history, write_stemgen_files)
from conftest import REPO, TINY_FOLDER, TINY_LORA, VOCAB
from pack_loader import load_pack
from test_workflows import (SAMPLES_PER_FRAME, SOURCE_RATE, SOURCE_SECONDS, TINY_PROFILE, TINY_PROFILE_15,
                            source_tone)
from tiny15 import BASE as TINY15_BASE
from tiny15 import MAIN as TINY15_MAIN
from tiny15 import write_tiny15

pytestmark = comfyui_mark()

PACK_DIR = "comfyui-acestep"
HOST = "127.0.0.1"
START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", "300"))
PROMPT_TIMEOUT = float(os.environ.get("COMFYUI_PROMPT_TIMEOUT", "600"))
SOURCE_FILE = "source.wav"
# Inputs the examples set that the tiny run replaces, on top of the headless runner's TINY_PROFILE.
REAL_PROFILE = {
    ("LoadAudio", "audio"): SOURCE_FILE,
    ("EmptyAceStepLatentAudio", "seconds"): 2.0,
    ("AceStepStemGen", "steps"): 2,
    ("AceStepSinging2Accompaniment", "steps"): 2,
}
AUDIO_OUTPUTS = ("SaveAudio", "PreviewAudio", "AceStepSaveAudio")
APP_PARAMS = REPO / "tests" / "data" / "app"  # official parameter files, for ACE-Step Load Params
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FULL_SCALE = 0.999

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
DISPLAY = pack.NODE_DISPLAY_NAME_MAPPINGS
API_DIR = REPO / "tests" / "api_workflows"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))


# ---------------------------------------------------------------------------------------------------------------
# a minimal websocket client (RFC 6455, client side, text frames), standard library only


class WebSocket:
    """Reads JSON text messages from ComfyUI's /ws; binary frames (previews) are skipped."""

    def __init__(self, port: int, path: str, timeout: float):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("websocket closed by the server")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        header = bytes([0x80 | opcode]) + (
            bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack(">H", size)
            if size < 1 << 16 else bytes([0x80 | 127]) + struct.pack(">Q", size)
        )
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self, deadline: float) -> dict | None:
        """The next JSON text message (None for a binary one), waiting at most until `deadline`."""
        message, kind = b"", None
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            first, second = self._take(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                (size,) = struct.unpack(">H", self._take(2))
            elif size == 127:
                (size,) = struct.unpack(">Q", self._take(8))
            payload = self._take(size)
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode in (0x1, 0x2):
                kind = opcode
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return json.loads(message) if kind == 0x1 else None

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------------------------
# the server


@dataclass
class Server:
    port: int
    base: Path
    log: Path
    process: subprocess.Popen
    report: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def supported_flags(python: str, comfy: Path) -> set[str]:
    """The command-line flags this ComfyUI's main.py knows."""
    out = subprocess.run([python, "main.py", "--help"], cwd=comfy, capture_output=True, text=True, timeout=120)
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def server_command(python: str, comfy: Path, base: Path, port: int) -> list[str]:
    """main.py on CPU, loopback only, everything under `base`; older releases get the equivalent folder flags."""
    flags = supported_flags(python, comfy)
    command = [python, "main.py", "--cpu", "--listen", HOST, "--port", str(port)]
    if "--base-directory" in flags:
        command += ["--base-directory", str(base)]
    else:
        config = base / "extra_model_paths.yaml"
        config.write_text(f"test:\n  base_path: {base}\n  custom_nodes: custom_nodes\n"
                          f"  ace_step: models/ace_step\n  loras: models/loras\n")
        command += ["--extra-model-paths-config", str(config)]
        for kind in ("output", "input", "temp"):
            command += [f"--{kind}-directory", str(base / kind)]
    if "--database-url" in flags:
        command += ["--database-url", f"sqlite:///{base / 'comfyui.db'}"]
    if "--disable-auto-launch" in flags:
        command.append("--disable-auto-launch")
    return command


def prepare_base(base: Path) -> None:
    """custom_nodes/<pack>, models/ace_step/<tiny> (v1, and the tiny 1.5 folders in the official layout),
    models/loras/<tiny lora>, input/source.wav."""
    for folder in ("custom_nodes", "models/ace_step", "models/loras", "input", "output", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR).symlink_to(REPO, target_is_directory=True)
    (base / "models" / "ace_step" / TINY_FOLDER.name).symlink_to(TINY_FOLDER, target_is_directory=True)
    write_tiny15(base / "models" / "ace_step")
    (base / "models" / "loras" / TINY_LORA.name).symlink_to(TINY_LORA, target_is_directory=True)
    source = source_tone()
    soundfile.write(str(base / "input" / SOURCE_FILE), source["waveform"][0].T.numpy(), source["sample_rate"])
    write_stemgen_files(base / "models" / "loras", TINY_FOLDER)
    install_probe(base / "custom_nodes")
    for params_file in APP_PARAMS.glob("*_input_params.json"):
        (base / "input" / params_file.name).write_bytes(params_file.read_bytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    require_comfyui()
    comfy = Path(COMFYUI_DIR).expanduser().resolve()
    if not (comfy / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py; point it at a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    if os.environ.get("ACESTEP_TEST_PIP_INSTALL") == "1":
        subprocess.run([python, "-m", "pip", "install", "-q", "-r", str(REPO / "requirements.txt")], check=True,
                       timeout=1800)
    base = tmp_path_factory.mktemp("comfyui_base")
    prepare_base(base)
    port = free_port()
    log = base / "server.log"
    env = {**os.environ, "ACESTEP_LYRIC_VOCAB": str(VOCAB), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(server_command(python, comfy, base, port), cwd=comfy, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    running = Server(port, base, log, process)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{running.log_tail()}")
            if time.monotonic() - started > START_TIMEOUT:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT:.0f} s:\n{running.log_tail()}")
            try:
                running.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        running.report["start_seconds"] = round(time.monotonic() - started, 1)
        yield running
    finally:
        stop(process)
        print(f"\nComfyUI run: {json.dumps(running.report)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


# ---------------------------------------------------------------------------------------------------------------
# import and /object_info


def test_pack_imported_without_error(server):
    log = server.log.read_text(errors="replace")
    pack_lines = [line for line in log.splitlines() if PACK_DIR in line]
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], log[-4000:]
    assert any(re.search(rf"seconds: .*custom_nodes/{re.escape(PACK_DIR)}$", line) for line in pack_lines), (
        f"the pack is not in the import-times table:\n{server.log_tail()}"
    )


def test_the_page_loads_each_pack_extension_once(server):
    """GET /extensions (the list the editor page loads its extensions from) names every file of web/ exactly once:
    the pack registers its web folder once (WEB_DIRECTORY only), so no extension runs twice."""
    web = REPO / "web"
    ours = sorted(p.relative_to(web).as_posix() for p in web.rglob("*.js"))
    listed = [entry for entry in server.get("/extensions") if entry.startswith("/extensions/")]
    pack_entries = [entry.split("/", 3)[3] for entry in listed if entry.split("/", 3)[3] in ours]
    assert sorted(pack_entries) == ours, f"pack extensions listed {pack_entries}, expected each of {ours} once"


def test_object_info_lists_every_node_with_its_inputs(server):
    info = server.get("/object_info")
    ours = {name for name, entry in info.items() if entry.get("python_module") == f"custom_nodes.{PACK_DIR}"}
    assert ours == set(NODES)
    for name, cls in NODES.items():
        entry, spec = info[name], cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert list(entry["input"].get(section, {})) == list(spec.get(section, {})), f"{name} {section}"
            for key, (kind, options) in spec.get(section, {}).items():
                assert entry["input"][section][key][1].get("tooltip") == options.get("tooltip"), f"{name}.{key}"
        assert entry["output"] == list(cls.RETURN_TYPES) and entry["output_name"] == list(cls.RETURN_NAMES)
        assert entry["display_name"] == DISPLAY[name] and entry["category"] == cls.CATEGORY
        assert entry["description"] == cls.DESCRIPTION
        assert entry["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
    server.report["nodes"] = len(ours)


def test_model_combos_list_the_files_in_comfyuis_model_folders(server):
    loader = server.get("/object_info/AceStepLoader")["AceStepLoader"]
    lora = server.get("/object_info/AceStepLoraLoader")["AceStepLoraLoader"]
    assert TINY_FOLDER.name in loader["input"]["required"]["checkpoint"][0]
    assert {TINY15_MAIN, TINY15_BASE} <= set(loader["input"]["required"]["checkpoint"][0])
    assert TINY_LORA.name in lora["input"]["required"]["lora_name"][0]


# ---------------------------------------------------------------------------------------------------------------
# workflows


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def tiny_prompt(name: str) -> dict:
    """The API workflow with the tiny checkpoint, few steps and 2-second sources."""
    prompt = json.loads((API_DIR / f"{name}.json").read_text())
    profile = {**(TINY_PROFILE_15 if name.startswith("acestep15_") else TINY_PROFILE), **REAL_PROFILE}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if not is_link(value):
                node["inputs"][key] = profile.get((node["class_type"], key), value)
    return prompt


def source_frames() -> int:
    """Latent frames of the 2 s 48 kHz source after resampling to 44.1 kHz (padded to whole frames)."""
    samples_44k = math.ceil(SOURCE_SECONDS * SOURCE_RATE * 44100 / SOURCE_RATE)
    return math.ceil(samples_44k / SAMPLES_PER_FRAME)


def frames_of(prompt: dict, ref: list) -> int:
    """Latent frames a node output carries (a task mark counts as the length the sampler will produce)."""
    node = prompt[ref[0]]
    kind, inputs = node["class_type"], node["inputs"]
    if kind == "AceStepEmptyLatent":
        seconds = inputs["seconds"]
        if is_link(seconds):  # from ACE-Step Load Params: the file's audio_duration
            assert prompt[seconds[0]]["class_type"] == "AceStepLoadParams" and seconds[1] == 2
            name = prompt[seconds[0]]["inputs"]["params_file"]
            seconds = json.loads((APP_PARAMS / name).read_text(encoding="utf-8"))["audio_duration"]
        return int(seconds * 44100 / SAMPLES_PER_FRAME)
    if kind == "EmptyAceStepLatentAudio":
        return int(inputs["seconds"] * 44100 / 512 / 8)
    if kind == "AceStepEncode":
        return source_frames()
    if kind == "AceStepExtend":
        extra = sum(int(inputs[k] * 44100 / SAMPLES_PER_FRAME) for k in ("left_seconds", "right_seconds"))
        return frames_of(prompt, inputs["latent"]) + extra
    if kind in ("AceStepRepaintRegion", "AceStepAudio2Audio", "AceStepSampler", "AceStepFlowEdit"):
        return frames_of(prompt, inputs["latent"])
    raise AssertionError(f"no latent length rule for {kind}")


def expected_audio(prompt: dict, ref: list) -> tuple[int, int, int]:
    """(sample rate, samples, channels) of the AUDIO a node output carries."""
    node = prompt[ref[0]]
    if node["class_type"] == "AceStepDecode":
        rate = int(node["inputs"]["sample_rate"])
        frames = frames_of(prompt, node["inputs"]["latent"])
        return rate, math.ceil(frames * SAMPLES_PER_FRAME * rate / 44100), 2
    if node["class_type"] in ("AceStepStemGen", "AceStepSinging2Accompaniment"):
        # both outputs (the part, and the source mixed with it) have the length of the part decoded from the source
        rate = int(node["inputs"]["sample_rate"])
        return rate, math.ceil(source_frames() * SAMPLES_PER_FRAME * rate / 44100), 2
    if node["class_type"] == "LoadAudio":
        return SOURCE_RATE, int(SOURCE_SECONDS * SOURCE_RATE), 2
    raise AssertionError(f"no audio rule for {node['class_type']}")


def expected_audio_15(prompt: dict, ref: list) -> tuple[int, int, int]:
    """(sample rate, samples, channels) of a 1.5 workflow's decoded AUDIO: 25 latent frames per second, 1920
    samples per frame at 48 kHz; a new song has the empty latent's length, every other task the source's."""
    node = prompt[ref[0]]
    assert node["class_type"] == "AceStepDecode"
    producer = prompt[node["inputs"]["latent"][0]]
    empty = producer["inputs"].get("latent")
    if empty is not None and prompt[empty[0]]["class_type"] == "AceStep15EmptyLatent":
        frames = round(prompt[empty[0]]["inputs"]["seconds"] * 25)
    else:
        frames = int(SOURCE_SECONDS * 48000) // 1920
    rate = int(node["inputs"]["sample_rate"])
    return rate, math.ceil(frames * 1920 * rate / 48000), 2


def run_prompt(server: Server, prompt: dict) -> tuple[str, list[dict]]:
    """Queue a prompt and follow it on the websocket to its end; (prompt id, messages about it)."""
    client_id = uuid.uuid4().hex
    ws = WebSocket(server.port, f"/ws?clientId={client_id}", timeout=30)
    try:
        status, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, f"/prompt refused the workflow ({status}): {json.dumps(answer)[:3000]}"
        assert answer.get("node_errors") == {}, f"node_errors: {json.dumps(answer['node_errors'])[:3000]}"
        prompt_id, messages = answer["prompt_id"], []
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while True:
            try:
                message = ws.receive(deadline)
            except socket.timeout:
                pytest.fail(f"prompt did not finish within {PROMPT_TIMEOUT:.0f} s:\n{server.log_tail()}")
            if message is None or message.get("data", {}).get("prompt_id") != prompt_id:
                continue
            messages.append(message)
            if message["type"] == "execution_error":
                data = message["data"]
                pytest.fail(f"{data['node_type']} (node {data['node_id']}) failed: {data['exception_type']}: "
                            f"{data['exception_message']}\n{''.join(data.get('traceback', []))[-3000:]}")
            if message["type"] == "execution_interrupted":
                pytest.fail("the prompt was interrupted")
            if message["type"] == "execution_success":
                return prompt_id, messages
    finally:
        ws.close()


def check_audio_file(server: Server, entry: dict, rate: int, samples: int, channels: int) -> None:
    """The file exists, is served by /view, and holds finite, audible, unclipped audio of the expected shape."""
    folder = {"output": "output", "temp": "temp"}[entry["type"]]
    path = server.base / folder / entry["subfolder"] / entry["filename"]
    assert path.is_file(), f"{path} is missing"
    query = urllib.parse.urlencode({k: entry[k] for k in ("filename", "subfolder", "type")})
    assert server.get(f"/view?{query}") == path.read_bytes()
    data, file_rate = soundfile.read(str(path), always_2d=True, dtype="float32")
    assert file_rate == rate, f"{path.name}: {file_rate} Hz, expected {rate}"
    assert data.shape == (samples, channels), f"{path.name}: {data.shape}, expected {(samples, channels)}"
    assert np.isfinite(data).all()
    assert float(np.sqrt(np.mean(data ** 2))) > 1e-4, f"{path.name} is silent"
    assert float(np.mean(np.abs(data) >= FULL_SCALE)) < 0.5, f"{path.name} is mostly full scale (NaN written?)"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_in_comfyui(server, name):
    prompt = tiny_prompt(name)
    started = time.monotonic()
    prompt_id, messages = run_prompt(server, prompt)
    lengths = {}
    server.report[name] = {"seconds": round(time.monotonic() - started, 1), "audio_seconds": lengths}
    executed = {m["data"]["node"] for m in messages if m["type"] == "executed"}
    history = wait_for_history(server, prompt_id)
    assert history["status"]["status_str"] == "success" and history["status"]["completed"]
    outputs = {node_id: node for node_id, node in prompt.items() if node["class_type"] in AUDIO_OUTPUTS}
    assert outputs, f"{name} has no audio output node"
    for node_id, node in outputs.items():
        assert node_id in executed, f"{node['class_type']} {node_id} never reported executed"
        (entry,) = history["outputs"][node_id]["audio"]
        expected = expected_audio_15 if name.startswith("acestep15_") else expected_audio
        rate, samples, channels = expected(prompt, node["inputs"]["audio"])
        check_audio_file(server, entry, rate, samples, channels)
        lengths[f"{node_id} {node['class_type']}"] = round(samples / rate, 3)
    for node_id, node in prompt.items():
        if node["class_type"] == "AceStepPreviewImage":
            (image,) = history["outputs"][node_id]["images"]
            assert (server.base / "temp" / image["filename"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_prompt_runs_again_from_cache(server):
    """Queueing the same workflow again reuses ComfyUI's cached node outputs (nothing re-runs)."""
    prompt = tiny_prompt(WORKFLOWS[0])
    run_prompt(server, prompt)
    _, messages = run_prompt(server, prompt)
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    assert set(cached) == set(prompt)


def test_a_bad_value_is_refused_with_node_errors(server):
    prompt = tiny_prompt(WORKFLOWS[0])
    loader = next(k for k, v in prompt.items() if v["class_type"] == "AceStepLoader")
    prompt[loader]["inputs"]["checkpoint"] = "no-such-checkpoint"
    status, answer = server.post("/prompt", {"prompt": prompt, "client_id": "refused"})
    assert status == 400 and loader in answer["node_errors"]
    assert "no-such-checkpoint" in json.dumps(answer["node_errors"][loader])



# ---------------------------------------------------------------------------------------------------------------
# memory: the pack's models live in ComfyUI's memory manager (docs/comfyui.md, "Memory")

TEXT2MUSIC_COMPONENTS = ["AceStepPackDCAE", "AceStepPackTextEncoder", "AceStepPackTransformer", "AceStepPackVocoder"]


def run_text2music(server: Server, seed: int, low_vram: bool = False) -> np.ndarray:
    """Run the text-to-music example with `seed` (and the Loader's `low_vram`); the samples of the file it saved."""
    prompt = tiny_prompt("acestep_text2music")
    (sampler,) = [node for node in prompt.values() if node["class_type"] == "AceStepSampler"]
    sampler["inputs"]["seed"] = seed
    (loader,) = [node for node in prompt.values() if node["class_type"] == "AceStepLoader"]
    loader["inputs"]["low_vram"] = low_vram
    prompt_id, _ = run_prompt(server, prompt)
    (save,) = [k for k, node in prompt.items() if node["class_type"] == "SaveAudio"]
    (entry,) = wait_for_history(server, prompt_id)["outputs"][save]["audio"]
    path = server.base / entry["type"] / entry["subfolder"] / entry["filename"]
    data, _ = soundfile.read(str(path), always_2d=True, dtype="float32")
    return data


def unloaded_report(server: Server) -> dict:
    """Poll the probe until ComfyUI has handled the /free flags (it does so between prompts)."""
    return wait_for(lambda: (lambda r: r if not pack_loaded(r) else None)(probe(server, run_prompt)),
                    "unloading the pack's models")


def test_free_releases_the_pack_models_and_the_next_run_loads_them_again(server):
    first = run_text2music(server, seed=1234)
    report = probe(server, run_prompt)
    assert set(TEXT2MUSIC_COMPONENTS) <= set(pack_loaded(report)), report  # (+ a StemGen branch of an earlier test)
    assert report["cached"] >= 1 and report["alive"] >= 1, report

    # the editor's "Unload models": out of ComfyUI's memory manager, out of the pack's cache, freed
    free(server, unload_models=True)
    report = unloaded_report(server)
    assert report["cached"] == 0 and report["alive"] == 0, report
    run_text2music(server, seed=4321)
    assert pack_loaded(probe(server, run_prompt)) == TEXT2MUSIC_COMPONENTS

    # "Free model and node cache" (POST /free with both flags): the same, and the same seed gives the same audio
    free(server, unload_models=True, free_memory=True)
    report = unloaded_report(server)
    assert report["cached"] == 0 and report["alive"] == 0, report
    again = run_text2music(server, seed=1234)
    assert pack_loaded(probe(server, run_prompt)) == TEXT2MUSIC_COMPONENTS
    assert again.shape == first.shape and np.array_equal(again, first)
    server.report["memory"] = {"loaded_after_run": TEXT2MUSIC_COMPONENTS, "after_free": report}


def test_progress_and_cancel_reach_the_pack_nodes_under_the_memory_manager(server):
    """The sampler's progress bar reaches the editor, Cancel (POST /interrupt) stops it, and the model still works."""
    prompt = tiny_prompt("acestep_text2music")
    (sampler,) = [k for k, node in prompt.items() if node["class_type"] == "AceStepSampler"]
    steps = 500
    prompt[sampler]["inputs"].update(seed=98765, steps=steps)
    client_id = uuid.uuid4().hex
    ws = WebSocket(server.port, f"/ws?clientId={client_id}", timeout=30)
    progress = []
    try:
        status, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200 and answer.get("node_errors") == {}, answer
        prompt_id, deadline = answer["prompt_id"], time.monotonic() + PROMPT_TIMEOUT
        while True:
            try:
                message = ws.receive(deadline)
            except socket.timeout:
                pytest.fail(f"the interrupted prompt did not end within {PROMPT_TIMEOUT:.0f} s:\n{server.log_tail()}")
            if message is None or message.get("data", {}).get("prompt_id") != prompt_id:
                continue
            if message["type"] == "progress" and message["data"]["node"] == sampler:
                progress.append((message["data"]["value"], message["data"]["max"]))
                if len(progress) == 2:
                    server.post("/interrupt", {})
            if message["type"] == "execution_interrupted":
                break
            if message["type"] in ("execution_success", "execution_error"):
                pytest.fail(f"expected the prompt to be interrupted, got {message['type']}")
    finally:
        ws.close()
    assert len(progress) >= 2 and all(total == steps for _, total in progress)
    assert [value for value, _ in progress[:2]] == [1, 2] and progress[-1][0] < steps
    # the interrupted run loaded its text encoder and transformer through ComfyUI, and they stay usable
    assert {"AceStepPackTextEncoder", "AceStepPackTransformer"} <= set(pack_loaded(probe(server, run_prompt)))
    assert run_text2music(server, seed=1234).shape[1] == 2


def test_low_vram_leaves_the_placement_to_comfyuis_memory_manager(server):
    """The Loader's low_vram inside ComfyUI (docs/memory-and-speed.md): each phase has ComfyUI load its components,
    the pack moves no weight itself; the same seed gives the same audio, and StemGen's phases run too."""
    plain = run_text2music(server, seed=2468)
    low = run_text2music(server, seed=2468, low_vram=True)
    assert low.shape == plain.shape and np.array_equal(low, plain)
    prompt = tiny_prompt("acestep_stemgen")
    for node in prompt.values():
        if node["class_type"] == "AceStepLoader":
            node["inputs"]["low_vram"] = True
    prompt_id, _ = run_prompt(server, prompt)
    assert wait_for_history(server, prompt_id)["status"]["status_str"] == "success"

def test_a_one_megabyte_lyric_is_refused_at_once_and_the_server_stays_responsive(server):
    """The red team's freeze: one 1 MB lyrics line sent through /prompt. The Text Encode node refuses it in a moment,
    naming the lyrics, and /queue answers within a second the whole time (docs/bad-inputs.md)."""
    def open_lyrics(prompt: dict) -> list[str]:
        return [k for k, v in prompt.items()
                if v["class_type"] == "AceStepTextEncode" and not is_link(v["inputs"].get("lyrics"))]

    name = next(n for n in WORKFLOWS if open_lyrics(tiny_prompt(n)))
    prompt = tiny_prompt(name)
    encode = open_lyrics(prompt)[0]
    prompt[encode]["inputs"]["lyrics"] = "la " * 333_333 + "a"  # 1,000,000 characters, no newline

    answered: list[float] = []  # seconds each /queue request took while the prompt ran
    done = threading.Event()

    def poll_queue() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                ok = "queue_running" in server.get("/queue")
            except (OSError, ValueError):  # no answer, or not the queue JSON: counted as never answered
                ok = False
            answered.append(time.monotonic() - started if ok else math.inf)
            time.sleep(0.1)

    client_id = uuid.uuid4().hex
    ws = WebSocket(server.port, f"/ws?clientId={client_id}", timeout=30)
    poller = threading.Thread(target=poll_queue, daemon=True)
    try:
        status, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200 and answer.get("node_errors") == {}, f"/prompt answered {status}: {str(answer)[:2000]}"
        poller.start()
        prompt_id, error = answer["prompt_id"], None
        deadline = time.monotonic() + 120
        while error is None:
            try:
                message = ws.receive(deadline)
            except socket.timeout:
                pytest.fail(f"the 1 MB lyric was not answered within 120 s:\n{server.log_tail()}")
            if message is None or message.get("data", {}).get("prompt_id") != prompt_id:
                continue
            if message["type"] == "execution_success":
                pytest.fail("a 1 MB lyric was accepted")
            if message["type"] == "execution_error":
                error = message["data"]
    finally:
        done.set()
        ws.close()
    poller.join(timeout=30)
    assert error["node_id"] == encode and error["exception_type"].endswith("ValueError"), error
    assert "lyrics are 1000000 characters long; at most" in error["exception_message"], error["exception_message"]
    assert answered, "/queue was never asked while the prompt ran"
    assert max(answered) < 1.0, f"/queue took up to {max(answered):.2f} s while the lyric was refused"
    started = time.monotonic()
    assert "queue_running" in server.get("/queue")
    assert time.monotonic() - started < 1.0
