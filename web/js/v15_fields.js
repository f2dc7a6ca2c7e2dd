// ACE-Step 1.5 fields of the Text Encode node (bpm, keyscale, timesignature, language): shown only
// when its `model` input comes (directly, through LoRA Loaders or Reroutes) from an ACE-Step Loader
// set to a 1.5 checkpoint or repo id, hidden for a v1 one, and shown while unlinked (family unknown).
// The server tells the 1.5 entries by their weights and lists them in the Loader's input options
// (nodes/loaders.py V15_OPTION). Hidden widgets stay in place with their values, so the workflow
// JSON (widget values by position) is unchanged; they are only drawn with no height.
import { app } from "../../../scripts/app.js";
import { LOADER, LORA_LOADER, V15_FIELDS, loaderFamily, showV15Fields, upstreamLoader, v15Lists } from "./lib/v15_fields.js";

const TEXT_ENCODE = "AceStepTextEncode";
const WATCHED = new Set([TEXT_ENCODE, LOADER, LORA_LOADER, "Reroute"]);
const HIDDEN_TYPE = "acestep_hidden";
const saved = new WeakMap(); // hidden widget -> its own type / computeSize before hiding
let lists = { checkpoints: new Set(), repos: new Set() };
let scheduled = false;

function own(object, key) {
  return Object.prototype.hasOwnProperty.call(object, key) ? { value: object[key] } : null;
}

function restore(widget, key, kept) {
  if (kept) widget[key] = kept.value;
  else delete widget[key];
}

/** Hide or show one widget in place; true when it changed. */
function setHidden(widget, hidden) {
  if (hidden === saved.has(widget)) return false;
  if (hidden) {
    saved.set(widget, { type: own(widget, "type"), computeSize: own(widget, "computeSize") });
    widget.type = HIDDEN_TYPE;
    widget.computeSize = () => [0, -4]; // LiteGraph's usual way to take no room (the -4 cancels the gap)
    widget.hidden = true;
  } else {
    const kept = saved.get(widget);
    saved.delete(widget);
    restore(widget, "type", kept.type);
    restore(widget, "computeSize", kept.computeSize);
    widget.hidden = false;
  }
  return true;
}

function update(node) {
  const show = showV15Fields(loaderFamily(upstreamLoader(node), lists));
  let changed = false;
  for (const widget of node.widgets ?? []) {
    if (V15_FIELDS.includes(widget.name)) changed = setHidden(widget, !show) || changed;
  }
  if (changed && typeof node.computeSize === "function" && Array.isArray(node.size)) {
    node.setSize?.([node.size[0], node.computeSize()[1]]);
  }
  return changed;
}

function refreshAll() {
  scheduled = false;
  const graph = app.graph;
  const nodes = graph?._nodes ?? graph?.nodes ?? [];
  let changed = false;
  for (const node of nodes) {
    if (node?.type !== TEXT_ENCODE) continue;
    try {
      changed = update(node) || changed;
    } catch (error) {
      console.error("[acestep.v15Fields]", error);
    }
  }
  if (changed) graph?.setDirtyCanvas?.(true, true);
}

/** Refresh every Text Encode node once the current change (connection, value, load) is done. */
function schedule() {
  if (scheduled) return;
  scheduled = true;
  setTimeout(refreshAll, 0);
}

function after(proto, method) {
  const original = proto[method];
  proto[method] = function () {
    const result = original?.apply(this, arguments);
    schedule();
    return result;
  };
}

app.registerExtension({
  name: "acestep.v15Fields",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name === LOADER) lists = v15Lists(nodeData);
    if (!WATCHED.has(name)) return;
    const proto = nodeType.prototype;
    for (const method of ["onConnectionsChange", "onConfigure", "onRemoved"]) after(proto, method);

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (name === LOADER) {
        for (const widget of this.widgets ?? []) {
          if (widget.name !== "checkpoint" && widget.name !== "repo_id") continue;
          const callback = widget.callback;
          widget.callback = function () {
            const value = callback?.apply(this, arguments);
            schedule();
            return value;
          };
        }
      }
      schedule();
      return result;
    };
  },
  afterConfigureGraph() {
    schedule();
  },
});
