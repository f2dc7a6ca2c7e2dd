// Upload button for ACE-Step Load Params: picks a *_input_params.json (the file the official app saves beside
// every song), stores it in ComfyUI/input through the editor's upload route, and selects it in the combo,
// as Load Audio's upload button does for audio.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const OPTION = "acestep_params_upload";

function uploadsParams(nodeData) {
  for (const spec of Object.values(nodeData?.input?.required ?? {})) {
    if (Array.isArray(spec) && spec[1]?.[OPTION]) return true;
  }
  return false;
}

async function upload(file) {
  const body = new FormData();
  body.append("image", file, file.name); // the route's field name; it stores any file type
  body.append("type", "input");
  body.append("overwrite", "true");
  const response = await api.fetchApi("/upload/image", { method: "POST", body });
  if (!response.ok) throw new Error(`upload of ${file.name} failed: ${response.status} ${response.statusText}`);
  const data = await response.json();
  return data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
}

function addUploadButton(node) {
  const combo = node.widgets?.find((w) => w.name === "params_file");
  if (!combo || typeof node.addWidget !== "function") return;
  const input = document.createElement("input");
  input.type = "file";
  input.accept = ".json,application/json";
  input.style.display = "none";
  input.addEventListener("change", async () => {
    const file = input.files?.[0];
    input.value = "";
    if (!file) return;
    try {
      const name = await upload(file);
      const values = combo.options?.values;
      if (Array.isArray(values) && !values.includes(name)) values.push(name);
      combo.value = name;
      combo.callback?.(name);
      app.canvas?.setDirty?.(true, true);
    } catch (error) {
      console.error("[acestep.paramsUpload]", error);
      window.alert?.(String(error.message ?? error));
    }
  });
  document.body.append(input);
  const button = node.addWidget("button", "upload params file", null, () => input.click());
  button.serialize = false;
  button.options = { ...(button.options ?? {}), serialize: false };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    input.remove();
    return onRemoved?.apply(this, arguments);
  };
}

app.registerExtension({
  name: "acestep.paramsUpload",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!uploadsParams(nodeData)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        addUploadButton(this);
      } catch (error) {
        console.error("[acestep.paramsUpload]", error);
      }
      return result;
    };
  },
});
