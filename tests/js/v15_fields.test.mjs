// Pure logic of the ACE-Step 1.5 fields toggle: the loader lists, the walk up to the Loader, the family.
import assert from "node:assert/strict";
import test from "node:test";

import {
  LOADER, LORA_LOADER, V15_FIELDS, V15_OPTION, loaderFamily, showV15Fields, upstreamLoader, v15Lists,
} from "../../web/js/lib/v15_fields.js";

/** A LiteGraph-like node: inputs by name, each linked to another node or null. */
function node(type, links = {}, widgets = {}) {
  const names = Object.keys(links);
  return {
    type,
    inputs: names.map((name) => ({ name })),
    getInputNode: (slot) => links[names[slot]] ?? null,
    widgets: Object.entries(widgets).map(([name, value]) => ({ name, value })),
  };
}

const LOADER_DATA = {
  input: {
    required: { checkpoint: [["Ace-Step1.5", "acestep-v1-tiny", "my.safetensors"], { [V15_OPTION]: ["Ace-Step1.5", "my.safetensors"] }] },
    optional: { repo_id: ["STRING", { default: "", [V15_OPTION]: ["ACE-Step/Ace-Step1.5"] }] },
  },
};
const lists = v15Lists(LOADER_DATA);

test("the lists come from the loader's option dicts, empty when absent", () => {
  assert.deepEqual([...lists.checkpoints], ["Ace-Step1.5", "my.safetensors"]);
  assert.deepEqual([...lists.repos], ["ACE-Step/Ace-Step1.5"]);
  for (const data of [undefined, {}, { input: { required: { checkpoint: [["a"], {}] } } }]) {
    const empty = v15Lists(data);
    assert.equal(empty.checkpoints.size + empty.repos.size, 0);
  }
  assert.deepEqual(V15_FIELDS, ["bpm", "keyscale", "timesignature", "language"]);
});

test("the loader is found directly, through LoRA loaders and reroutes, and not through other nodes", () => {
  const loader = node(LOADER, {}, { checkpoint: "Ace-Step1.5", repo_id: "" });
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: loader })), loader);
  const chain = node(LORA_LOADER, { model: node("Reroute", { "": node(LORA_LOADER, { model: loader }) }) });
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: chain })), loader);
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: null })), null, "unlinked");
  assert.equal(upstreamLoader(node("AceStepTextEncode", {})), null, "no model input");
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: node(LORA_LOADER, { model: null }) })), null);
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: node("SomethingElse", { model: loader }) })), null);
  const cycle = node(LORA_LOADER, { model: null });
  cycle.getInputNode = () => cycle;
  assert.equal(upstreamLoader(node("AceStepTextEncode", { model: cycle })), null, "a cycle ends");
});

test("the family follows the loader: repo_id first, then the checkpoint", () => {
  const family = (checkpoint, repo_id) => loaderFamily(node(LOADER, {}, { checkpoint, repo_id }), lists);
  assert.equal(family("Ace-Step1.5", ""), "1.5");
  assert.equal(family("my.safetensors", "  "), "1.5", "a blank repo_id is no repo");
  assert.equal(family("acestep-v1-tiny", ""), "v1");
  assert.equal(family("acestep-v1-tiny", " ACE-Step/Ace-Step1.5 "), "1.5", "a 1.5 repo id wins over a v1 checkpoint");
  assert.equal(family("Ace-Step1.5", "ACE-Step/ACE-Step-v1-3.5B"), "v1", "any other repo is a v1 download");
  assert.equal(loaderFamily(null, lists), null);
});

test("the fields show for a 1.5 model and an unknown family, not for a v1 model", () => {
  assert.equal(showV15Fields("1.5"), true);
  assert.equal(showV15Fields(null), true);
  assert.equal(showV15Fields("v1"), false);
});
