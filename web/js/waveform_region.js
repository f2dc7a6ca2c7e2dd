// Waveform region picker on AceStepRepaintRegion (widgets start_seconds, end_seconds)
// and AceStepExtend (widgets left_seconds, right_seconds): a canvas widget that draws
// the source audio and the region; dragging sets the two numbers (0.01 s steps, inside
// the audio), and typing in the numbers moves the highlight (it is drawn from them).
//
// The source audio, whichever changed last:
//  - in the editor: the file chosen on the node linked to the `audio` input, when that
//    node has an `audio` file widget (LoadAudio), fetched from
//    /view?filename=<name>&subfolder=<folder>&type=input;
//  - after a run: this node's executed message. The Python node must return
//      ui = {"audio": [{"filename": "<name>", "subfolder": "<folder>", "type": "temp"}]}
//    naming a copy of the source audio it received ("type" may also be "output").
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import {
  beginDrag, checkValues, computePeaks, dragTo, normalizeRegion, regionBounds, regionFromValues,
  secondsToX, valuesFromRegion, viewFor, xToSeconds,
} from "./lib/region.js";
import { executedAudioFile, parseFileValue, viewRoute } from "./lib/source.js";

const NODES = {
  AceStepRepaintRegion: { mode: "repaint", widgets: ["start_seconds", "end_seconds"] },
  AceStepExtend: { mode: "extend", widgets: ["left_seconds", "right_seconds"] },
};
const HEIGHT = 110;
const MARGIN = 10;
const LABEL_HEIGHT = 18;
const EDGE_PIXELS = 6;
const DECODE_RATE = 16000;
const COLORS = {
  background: "#1b1d21",
  source: "#262a31",
  centre: "#3a3f48",
  wave: "#6cb6ff",
  region: "rgba(255, 160, 0, 0.35)",
  edge: "#ffa000",
  text: "#c8c8c8",
  warning: "#ff7070",
};

const pickers = new WeakMap();
const decoded = new Map();

function redraw() {
  app.canvas?.setDirty?.(true, true);
}

/** Decoded audio of a /view route, {channels: Float32Array[], duration}, cached. */
function loadAudio(route) {
  if (!decoded.has(route)) {
    if (decoded.size >= 8) decoded.delete(decoded.keys().next().value);
    const promise = (async () => {
      const response = await api.fetchApi(route);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const buffer = await new OfflineAudioContext(1, 1, DECODE_RATE).decodeAudioData(await response.arrayBuffer());
      const channels = Array.from({ length: buffer.numberOfChannels }, (_, c) => buffer.getChannelData(c));
      return { channels, duration: buffer.duration };
    })();
    promise.catch(() => decoded.delete(route));
    decoded.set(route, promise);
  }
  return decoded.get(route);
}

/** /view route of the file chosen on the node feeding the `audio` input, or null. */
function upstreamRoute(node) {
  const slot = node.inputs?.findIndex((input) => input.name === "audio") ?? -1;
  if (slot < 0) return null;
  let source = node.getInputNode?.(slot);
  for (let hop = 0; source?.type === "Reroute" && hop < 32; hop++) source = source.getInputNode?.(0);
  const value = source?.widgets?.find((w) => w.name === "audio")?.value;
  return typeof value === "string" && value !== "" ? viewRoute(parseFileValue(value)) : null;
}

class RegionPicker {
  constructor(node, spec, widgetA, widgetB) {
    Object.assign(this, { node, mode: spec.mode, widgetA, widgetB });
    this.route = null;
    this.fromRun = false;
    this.upstream = undefined;
    this.audio = null;
    this.status = "";
    this.peaks = null;
    this.drag = null;
    this.plot = null;
  }

  values() {
    return [Number(this.widgetA.value), Number(this.widgetB.value)];
  }

  setValues(a, b) {
    for (const [widget, value] of [[this.widgetA, a], [this.widgetB, b]]) {
      if (widget.value === value) continue;
      widget.value = value;
      widget.callback?.call(widget, value, app.canvas, this.node);
    }
  }

  /** Duration, bounds, region and view for the current values and audio. */
  timeline() {
    const [a, b] = this.values();
    const known = this.audio?.duration;
    const nominal = this.mode === "extend" ? 10 : Math.max(10, b * 1.25);
    const duration = known ?? nominal;
    const maxA = this.widgetA.options?.max ?? Infinity;
    const maxB = this.widgetB.options?.max ?? Infinity;
    const bounds = regionBounds(this.mode, this.mode === "extend" ? duration : known, maxA, maxB);
    const region = normalizeRegion(this.mode, regionFromValues(this.mode, a, b, duration), bounds);
    const view = this.drag?.view ?? viewFor(this.mode, region, duration);
    return { a, b, known, duration, bounds, region, view };
  }

  setSource(route, fromRun) {
    this.fromRun = fromRun;
    if (route === this.route) return;
    Object.assign(this, { route, audio: null, peaks: null, status: route ? "loading audio…" : "" });
    if (!route) return;
    loadAudio(route).then(
      (audio) => {
        if (this.route !== route) return;
        Object.assign(this, { audio, status: "" });
        redraw();
      },
      (error) => {
        if (this.route !== route) return;
        this.status = `cannot read the audio: ${error.message ?? error}`;
        redraw();
      },
    );
  }

  /** Follow the upstream file widget; a new choice there replaces the last run's audio. */
  followUpstream() {
    const route = upstreamRoute(this.node);
    if (route === this.upstream) return;
    this.upstream = route;
    if (route) this.setSource(route, false);
    else if (!this.fromRun) this.setSource(null, false);
  }

  onExecuted(output) {
    const file = executedAudioFile(output);
    if (file) this.setSource(viewRoute(file), true);
    redraw();
  }

  draw(ctx, width, y) {
    this.followUpstream();
    const plot = { x0: MARGIN, width: Math.max(1, width - 2 * MARGIN), top: y + 4, height: HEIGHT - LABEL_HEIGHT - 8 };
    this.plot = plot;
    const { a, b, known, duration, region, view } = this.timeline();
    const toX = (t) => secondsToX(t, view, plot.x0, plot.width);
    const span = (t0, t1, color) => {
      const x0 = Math.max(plot.x0, toX(t0));
      const x1 = Math.min(plot.x0 + plot.width, toX(t1));
      if (x1 <= x0) return;
      ctx.fillStyle = color;
      ctx.fillRect(x0, plot.top, x1 - x0, plot.height);
    };
    const mid = plot.top + plot.height / 2;

    ctx.save();
    ctx.fillStyle = COLORS.background;
    ctx.fillRect(plot.x0, plot.top, plot.width, plot.height);
    span(0, duration, COLORS.source);
    ctx.fillStyle = COLORS.centre;
    ctx.fillRect(plot.x0, Math.round(mid), plot.width, 1);
    if (this.audio) this.drawWave(ctx, plot, toX(0), toX(duration), mid);

    if (this.mode === "extend") {
      span(region.start, 0, COLORS.region);
      span(duration, region.end, COLORS.region);
    } else {
      span(region.start, region.end, COLORS.region);
    }
    ctx.fillStyle = COLORS.edge;
    for (const t of [region.start, region.end]) {
      const x = toX(t);
      if (x >= plot.x0 && x <= plot.x0 + plot.width) ctx.fillRect(Math.round(x) - 1, plot.top, 2, plot.height);
    }

    ctx.font = "12px sans-serif";
    ctx.textBaseline = "middle";
    if (this.status || !this.route) {
      ctx.fillStyle = COLORS.text;
      ctx.textAlign = "center";
      ctx.fillText(this.status || "no audio yet: link a LoadAudio or run once", plot.x0 + plot.width / 2, plot.top + 12);
    }
    const warning = checkValues(this.mode, a, b, known);
    const source = known === undefined ? "" : ` (source ${known.toFixed(2)} s)`;
    const label = this.mode === "extend"
      ? `+${a.toFixed(2)} s before, +${b.toFixed(2)} s after${source}`
      : `${a.toFixed(2)} – ${b.toFixed(2)} s${source}`;
    ctx.fillStyle = warning ? COLORS.warning : COLORS.text;
    ctx.textAlign = "left";
    ctx.fillText(warning ? `${label}: ${warning}` : label, plot.x0, plot.top + plot.height + LABEL_HEIGHT / 2 + 2);
    ctx.restore();
  }

  drawWave(ctx, plot, xStart, xEnd, mid) {
    const columns = Math.max(1, Math.round(xEnd - xStart));
    if (this.peaks?.columns !== columns) {
      this.peaks = { columns, ...computePeaks(this.audio.channels, columns) };
    }
    const { min, max } = this.peaks;
    const half = plot.height / 2 - 2;
    ctx.fillStyle = COLORS.wave;
    for (let i = 0; i < columns; i++) {
      const x = xStart + (i * (xEnd - xStart)) / columns;
      if (x < plot.x0 || x >= plot.x0 + plot.width) continue;
      const top = mid - Math.min(1, max[i]) * half;
      const bottom = mid - Math.max(-1, min[i]) * half;
      ctx.fillRect(x, top, 1, Math.max(1, bottom - top));
    }
  }

  /** Legacy LiteGraph widget mouse callback: pointerdown / pointermove / pointerup. */
  mouse(event, pos) {
    if (!this.plot) return false;
    const kind = event.type.replace(/^mouse/, "pointer");
    if (kind === "pointerdown") {
      if (event.button > 0) return false;
      const { bounds, region, view } = this.timeline();
      const t = xToSeconds(pos[0], view, this.plot.x0, this.plot.width);
      const tolerance = (EDGE_PIXELS * (view.t1 - view.t0)) / this.plot.width;
      this.drag = { ...beginDrag(this.mode, t, region, bounds, tolerance), view };
      return true;
    }
    if (!this.drag || (kind !== "pointermove" && kind !== "pointerup")) return false;
    const t = xToSeconds(pos[0], this.drag.view, this.plot.x0, this.plot.width);
    const next = dragTo(this.drag, t);
    if (next) this.setValues(...valuesFromRegion(this.mode, next, this.drag.bounds.duration));
    if (kind === "pointerup") this.drag = null;
    return true;
  }
}

/** Run a widget callback without letting an error break the whole canvas. */
function guarded(picker, fn) {
  try {
    return fn();
  } catch (error) {
    if (!picker.failed) console.error("[acestep.waveformRegion]", error);
    picker.failed = true;
    return false;
  }
}

function addPicker(node, spec) {
  const [widgetA, widgetB] = spec.widgets.map((name) => node.widgets?.find((w) => w.name === name));
  if (!widgetA || !widgetB) return;
  const picker = new RegionPicker(node, spec, widgetA, widgetB);
  node.addCustomWidget({
    name: "acestep_waveform",
    type: "acestep_waveform",
    value: null,
    serialize: false,
    options: { serialize: false },
    computeSize: (width) => [width, HEIGHT],
    draw: (ctx, _node, width, y) => guarded(picker, () => picker.draw(ctx, width, y)),
    mouse: (event, pos) => guarded(picker, () => picker.mouse(event, pos)),
  });
  pickers.set(node, picker);
}

app.registerExtension({
  name: "acestep.waveformRegion",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = NODES[nodeData?.name];
    if (!spec) return;
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        addPicker(this, spec);
      } catch (error) {
        console.error("[acestep.waveformRegion]", error);
      }
      return result;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const picker = pickers.get(this);
      if (picker) guarded(picker, () => picker.onExecuted(output));
      return result;
    };

    const onConnectionsChange = proto.onConnectionsChange;
    proto.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      const picker = pickers.get(this);
      if (picker) {
        picker.upstream = undefined;
        redraw();
      }
      return result;
    };
  },
});
