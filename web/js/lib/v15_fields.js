// Which loader feeds a Text Encode node and whether its ACE-Step 1.5 fields apply (pure, no DOM).
// The server lists the 1.5 entries of the Loader's inputs under an extra option key (nodes/loaders.py
// V15_OPTION): the checkpoint names told 1.5 by their weights, and the 1.5 repo ids it downloads.

export const V15_FIELDS = ["bpm", "keyscale", "timesignature", "language"];
export const V15_OPTION = "acestep_v15";
export const LOADER = "AceStepLoader";
export const LORA_LOADER = "AceStepLoraLoader";
const MAX_HOPS = 64; // a cycle or an absurdly long chain ends the walk

/** The 1.5 checkpoint names and repo ids a Loader's nodeData lists: {checkpoints: Set, repos: Set}. */
export function v15Lists(nodeData) {
  const { required = {}, optional = {} } = nodeData?.input ?? {};
  const listed = (spec) => {
    const names = Array.isArray(spec) ? spec[1]?.[V15_OPTION] : undefined;
    return new Set(Array.isArray(names) ? names.filter((n) => typeof n === "string") : []);
  };
  return { checkpoints: listed(required.checkpoint ?? optional.checkpoint), repos: listed(optional.repo_id ?? required.repo_id) };
}

function inputNode(node, name) {
  const slot = node.inputs?.findIndex((input) => input.name === name) ?? -1;
  return slot < 0 ? null : node.getInputNode?.(slot) ?? null;
}

/**
 * The ACE-Step Loader node feeding `node`'s `model` input, directly or through LoRA Loaders and
 * Reroutes; null when the input is unlinked or fed by anything else.
 */
export function upstreamLoader(node) {
  let source = inputNode(node, "model");
  for (let hop = 0; source && hop < MAX_HOPS; hop++) {
    if (source.type === LOADER) return source;
    if (source.type === LORA_LOADER) source = inputNode(source, "model");
    else if (source.type === "Reroute") source = source.getInputNode?.(0) ?? null;
    else return null;
  }
  return null;
}

/**
 * "1.5" or "v1" for a Loader node as the server loads it (nodes/loaders.py load()): a non-empty
 * repo_id wins over checkpoint (a 1.5 repo id is 1.5, any other repo is downloaded as v1);
 * otherwise the checkpoint decides. null when there is no loader (family unknown).
 */
export function loaderFamily(loader, lists) {
  if (!loader) return null;
  const value = (name) => loader.widgets?.find((w) => w.name === name)?.value;
  const repo = typeof value("repo_id") === "string" ? value("repo_id").trim() : "";
  if (repo !== "") return lists.repos.has(repo) ? "1.5" : "v1";
  return lists.checkpoints.has(value("checkpoint")) ? "1.5" : "v1";
}

/**
 * Whether the 1.5 fields are shown: yes for a 1.5 model, no for a v1 model, and yes while the
 * family is unknown (unlinked or fed by another node), so that nothing a workflow sets is hidden
 * without a reason; the server refuses them set on a v1 model anyway (nodes/v15.py).
 */
export function showV15Fields(family) {
  return family !== "v1";
}
