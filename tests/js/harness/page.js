// Browser harness: a LiteGraph-like stub just big enough for the pack's extensions.
// It registers node types through the extensions' hooks the way the editor does
// (beforeRegisterNodeDef, then the constructor adds widgets, then onNodeCreated and
// nodeCreated), draws each node's canvas widgets on its own <canvas>, and forwards
// pointer events to the widget under the pointer as LiteGraph does for legacy
// widgets (pointerdown on the widget, then pointermove / pointerup until release).
import { app } from "/scripts/app.js";

const WIDTH = 400;
const nodes = {};
const errors = [];
window.addEventListener("error", (event) => errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => errors.push(String(event.reason)));

class StubNode {
  constructor(type) {
    Object.assign(this, { type, comfyClass: type, widgets: [], inputs: [], pos: [0, 0], size: [WIDTH, 300] });
    this.host = document.createElement("section");
    this.host.dataset.node = type;
    document.body.append(this.host);
  }

  addCustomWidget(widget) {
    this.widgets.push(widget);
    return widget;
  }

  addWidget(type, name, value, callback) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.dataset.widget = name;
    button.addEventListener("click", () => callback());
    this.host.append(button);
    const widget = { name, type, value, callback, element: button };
    this.widgets.push(widget);
    return widget;
  }

  addDOMWidget(name, type, element, options) {
    const widget = { name, type, element, options, value: undefined };
    this.host.append(element);
    this.widgets.push(widget);
    return widget;
  }

  getInputNode(slot) {
    return this.inputs[slot]?.source ?? null;
  }
}

function numberWidget(name, value, max) {
  return {
    name, type: "number", value, options: { min: 0, max, round: 0.01 },
    callback(v) {
      this.value = Math.round(v * 100) / 100;
    },
  };
}

function textWidget(node, name, text) {
  const textarea = document.createElement("textarea");
  textarea.name = name;
  textarea.value = text;
  node.host.append(textarea);
  return {
    name, type: "customtext", inputEl: textarea, element: textarea,
    get value() {
      return textarea.value;
    },
    set value(v) {
      textarea.value = v;
    },
  };
}

async function defineNode(nodeData, addWidgets) {
  class NodeType extends StubNode {}
  for (const extension of app.extensions) await extension.beforeRegisterNodeDef?.(NodeType, nodeData, app);
  return () => {
    const node = new NodeType(nodeData.name);
    addWidgets(node);
    node.onNodeCreated?.();
    for (const extension of app.extensions) extension.nodeCreated?.(node, app);
    nodes[nodeData.name] = node;
    return node;
  };
}

/** Canvas widgets of a node, stacked from y = 0, with their heights. */
function canvasWidgets(node) {
  let y = 0;
  return node.widgets.filter((w) => typeof w.draw === "function").map((widget) => {
    const height = widget.computeSize(WIDTH)[1];
    const placed = { widget, y, height };
    y += height;
    return placed;
  });
}

function attachCanvas(node) {
  const placed = canvasWidgets(node);
  const canvas = document.createElement("canvas");
  canvas.width = WIDTH;
  canvas.height = placed.reduce((sum, p) => sum + p.height, 0);
  node.host.append(canvas);
  node.canvas = canvas;
  let active = null;
  const forward = (event) => {
    const pos = [event.offsetX, event.offsetY];
    if (event.type === "pointerdown") {
      active = placed.find((p) => pos[1] >= p.y && pos[1] < p.y + p.height)?.widget ?? null;
      if (active) canvas.setPointerCapture(event.pointerId);
    }
    if (!active) return;
    active.mouse?.(event, pos, node);
    if (event.type === "pointerup") active = null;
    render();
  };
  for (const type of ["pointerdown", "pointermove", "pointerup"]) canvas.addEventListener(type, forward);
}

function render() {
  for (const node of Object.values(nodes)) {
    if (!node.canvas) continue;
    const ctx = node.canvas.getContext("2d");
    ctx.clearRect(0, 0, node.canvas.width, node.canvas.height);
    for (const { widget, y } of canvasWidgets(node)) widget.draw(ctx, node, WIDTH, y, 20);
  }
}

async function setup() {
  await import("/extensions/acestep/js/waveform_region.js");
  await import("/extensions/acestep/js/lyrics_helper.js");
  await import("/extensions/acestep/js/params_upload.js");
  await import("/extensions/acestep/js/v15_fields.js");
  app.canvas.onDirty = render;
  app.graph = { get _nodes() { return Object.values(nodes); }, setDirtyCanvas: () => {} };

  const loadAudio = (await defineNode({ name: "LoadAudio", input: { required: { audio: [[]] } } }, (node) => {
    node.widgets.push({ name: "audio", type: "combo", value: "harness/sine.wav" });
  }))();
  const regionNode = async (name, a, b, max) => {
    const create = await defineNode({ name, input: { required: { audio: ["AUDIO"], [a]: ["FLOAT"], [b]: ["FLOAT"] } } }, (node) => {
      node.inputs.push({ name: "audio", type: "AUDIO", source: loadAudio });
      node.widgets.push(numberWidget(a, name === "AceStepExtend" ? 0 : 1, max), numberWidget(b, name === "AceStepExtend" ? 1.5 : 2, max));
    });
    attachCanvas(create());
  };
  await regionNode("AceStepRepaintRegion", "start_seconds", "end_seconds", 240);
  await regionNode("AceStepExtend", "left_seconds", "right_seconds", 2);

  const lyricsNode = async (name, widgetNames) => {
    const required = Object.fromEntries(widgetNames.map((w) => [w, ["STRING", { multiline: true }]]));
    const create = await defineNode({ name, input: { required } }, (node) => {
      for (const w of widgetNames) node.widgets.push(textWidget(node, w, "oh my love"));
    });
    create();
  };
  await lyricsNode("AceStepTextEncode", ["lyrics"]);
  // The 1.5 fields (web/js/v15_fields.js) after the lyrics, a LoRA Loader and a Loader to link them to.
  const encode = nodes.AceStepTextEncode;
  encode.inputs.push({ name: "model", type: "ACESTEP_MODEL", source: null });
  for (const [name, type, value] of [["bpm", "number", 96], ["keyscale", "combo", "C major"], ["timesignature", "combo", "3"], ["language", "combo", "de"]]) {
    encode.widgets.push({ name, type, value });
  }
  const choice = (name, value) => ({ name, type: "combo", value, callback(v) { this.value = v; } });
  const loader = (await defineNode({
    name: "AceStepLoader",
    input: {
      required: { checkpoint: [["Ace-Step1.5", "acestep-v1-tiny"], { acestep_v15: ["Ace-Step1.5"] }] },
      optional: { repo_id: ["STRING", { default: "", acestep_v15: ["ACE-Step/Ace-Step1.5"] }] },
    },
  }, (node) => node.widgets.push(choice("checkpoint", "acestep-v1-tiny"), choice("repo_id", ""))))();
  (await defineNode({ name: "AceStepLoraLoader", input: { required: { model: ["ACESTEP_MODEL"] } } }, (node) => {
    node.inputs.push({ name: "model", type: "ACESTEP_MODEL", source: loader });
  }))();
  await lyricsNode("AceStepFlowEdit", ["lyrics", "target_lyrics"]);
  await lyricsNode("SomeoneElsesNode", ["lyrics"]);
  const files = ["old_input_params.json"];
  const params = await defineNode(
    { name: "AceStepLoadParams", input: { required: { params_file: [files, { acestep_params_upload: true }] } } },
    (node) => node.widgets.push({ name: "params_file", type: "combo", value: files[0], options: { values: files } }),
  );
  params();
  render();
}

function widget(nodeName, widgetName) {
  return nodes[nodeName].widgets.find((w) => w.name === widgetName);
}

window.harness = {
  ready: setup().catch((error) => errors.push(String(error?.stack ?? error))),
  errors,
  render,
  /** RGBA of one pixel of a node's widget canvas. */
  pixel(nodeName, x, y) {
    return Array.from(nodes[nodeName].canvas.getContext("2d").getImageData(x, y, 1, 1).data);
  },
  value: (nodeName, widgetName) => widget(nodeName, widgetName).value,
  /** Set a number widget as the editor does when the user types a value. */
  type(nodeName, widgetName, value) {
    const w = widget(nodeName, widgetName);
    w.callback(value);
    render();
  },
  executed(nodeName, output) {
    nodes[nodeName].onExecuted?.(output);
  },
  /** min/max height a DOM widget asks the editor for. */
  domHeight(nodeName, widgetName) {
    const w = widget(nodeName, widgetName);
    return [w.options.getMinHeight(), w.options.getMaxHeight()];
  },
  /** name, serialize and options.serialize of every widget, in order. */
  widgets: (nodeName) =>
    nodes[nodeName].widgets.map((w) => ({ name: w.name, serialize: w.serialize, options: w.options?.serialize })),
  /** The Text Encode node's 1.5 widgets once the pending refresh ran: name, value, hidden, height. */
  async v15Fields() {
    await new Promise((resolve) => setTimeout(resolve, 20));
    return nodes.AceStepTextEncode.widgets.slice(-4).map((w) => ({
      name: w.name, value: w.value, hidden: Boolean(w.hidden), height: w.computeSize ? w.computeSize(WIDTH)[1] : null,
    }));
  },
  /** Link the Text Encode node's model input to a node (by name) or unlink it (null). */
  linkModel(sourceName) {
    const encode = nodes.AceStepTextEncode;
    encode.inputs.find((input) => input.name === "model").source = sourceName ? nodes[sourceName] : null;
    encode.onConnectionsChange?.();
  },
  /** Choose a value on the Loader as the user does. */
  setLoader(widgetName, value) {
    widget("AceStepLoader", widgetName).callback(value);
  },
  /** Choose another file on the LoadAudio node, as the user does in its combo. */
  chooseFile(value) {
    widget("LoadAudio", "audio").value = value;
    render();
  },
};
