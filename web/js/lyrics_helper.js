// Lyrics helper on every AceStep* node with a multiline `lyrics` or `target_lyrics`
// widget: buttons that put a structure tag on its own line at the cursor, and a status
// line with the line count, the sections, a guessed language per section (the backend
// detects the language of each line itself) and warnings for tags the model does not know.
import { app } from "../../../scripts/app.js";
import { TOOLBAR_TAGS, analyzeLyrics, describeWarnings, insertTag, summarize } from "./lib/lyrics.js";

const LYRICS_WIDGETS = ["lyrics", "target_lyrics"];
const LINE_HEIGHT = 15; // the status and the warning line
const BUTTON_ROW = 20;
const BUTTON_WIDTH = 62; // a [chorus] button with its gap, for the estimate before the toolbar is laid out
const toolbars = new WeakMap();

function declaresInput(nodeData, name) {
  const { required = {}, optional = {} } = nodeData?.input ?? {};
  return name in required || name in optional;
}

function element(tag, style, text = "") {
  const el = document.createElement(tag);
  el.style.cssText = style;
  el.textContent = text;
  return el;
}

/** Toolbar + status for one textarea; returns a function that refreshes the status. */
function addToolbar(node, widget, textarea, labelled) {
  const root = element("div", "display:flex;flex-direction:column;gap:2px;font:11px sans-serif;color:#bbb;overflow:hidden");
  root.className = "acestep-lyrics-tools";
  // The buttons wrap onto a second row on a narrow node instead of hiding behind a scroll bar.
  const buttons = element("div", "display:flex;flex-wrap:wrap;gap:2px 3px;flex:none");
  const status = element("div", "white-space:nowrap;overflow:hidden;text-overflow:ellipsis");
  const warning = element("div", "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:#ff8080");
  status.className = "acestep-lyrics-status";
  warning.className = "acestep-lyrics-warning";
  if (labelled) buttons.append(element("span", "align-self:center", `${widget.name}:`));

  const refresh = () => {
    const analysis = analyzeLyrics(textarea.value);
    status.textContent = status.title = summarize(analysis);
    const warnings = describeWarnings(analysis);
    warning.title = warnings.join("\n");
    warning.textContent = warnings.length > 1 ? `⚠ ${warnings[0]} (+${warnings.length - 1} more)` : warnings.length ? `⚠ ${warnings[0]}` : "";
  };

  for (const tag of TOOLBAR_TAGS) {
    const button = element("button", "font:11px monospace;padding:1px 4px;cursor:pointer", `[${tag}]`);
    button.type = "button";
    button.title = `insert [${tag}] on its own line at the cursor`;
    button.addEventListener("mousedown", (event) => event.preventDefault());
    button.addEventListener("click", () => {
      const { text, cursor } = insertTag(textarea.value, textarea.selectionStart, tag);
      textarea.value = text;
      textarea.focus();
      textarea.setSelectionRange(cursor, cursor);
      textarea.dispatchEvent(new Event("input", { bubbles: true }));
    });
    buttons.append(button);
  }
  root.append(buttons, status, warning);
  textarea.addEventListener("input", refresh);

  // As tall as the (wrapped) buttons plus the two text lines: measured once laid out, estimated before.
  const height = () => {
    const rows = buttons.offsetHeight > 0 ? buttons.offsetHeight
      : BUTTON_ROW * Math.ceil((TOOLBAR_TAGS.length * BUTTON_WIDTH) / Math.max(BUTTON_WIDTH, (node.size?.[0] ?? 400) - 20));
    return rows + 2 * LINE_HEIGHT + 8;
  };
  const toolbar = node.addDOMWidget(`acestep_${widget.name}_tools`, "acestep_lyrics_tools", root, {
    serialize: false,
    getMinHeight: height,
    getMaxHeight: height,
  });
  toolbar.serialize = false;
  refresh();
  return refresh;
}

app.registerExtension({
  name: "acestep.lyricsHelper",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (typeof nodeData?.name !== "string" || !nodeData.name.startsWith("AceStep")) return;
    const names = LYRICS_WIDGETS.filter((name) => declaresInput(nodeData, name));
    if (names.length === 0) return;
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        const refreshers = [];
        for (const name of names) {
          const widget = this.widgets?.find((w) => w.name === name);
          const textarea = widget?.inputEl ?? widget?.element;
          if (textarea?.tagName !== "TEXTAREA" || typeof this.addDOMWidget !== "function") continue;
          refreshers.push(addToolbar(this, widget, textarea, names.length > 1));
        }
        toolbars.set(this, refreshers);
      } catch (error) {
        console.error("[acestep.lyricsHelper]", error);
      }
      return result;
    };

    // Loading a workflow sets the text without an input event.
    const onConfigure = proto.onConfigure;
    proto.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      for (const refresh of toolbars.get(this) ?? []) refresh();
      return result;
    };
  },
});
