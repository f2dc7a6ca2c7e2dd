// Draws a thumbnail of every example workflow: example_workflows/<name>.jpg beside <name>.json, the name ComfyUI's
// template browser looks for (the custom-node template convention: a jpg of the same name). The picture is the
// graph itself (nodes at their positions, coloured by role, links coloured by type) under the workflow's title.
// Run: node tests/js/thumbnails.mjs   (needs /usr/bin/chromium and npm's playwright-core, as browser_check.mjs).
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const EXAMPLES = path.resolve(HERE, "../../example_workflows");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const WIDTH = 640;
const HEIGHT = 400;

function draw(workflow, title) {
  const W = 640;
  const H = 400;
  const BANNER = 64;
  const canvas = document.createElement("canvas");
  canvas.width = W;
  canvas.height = H;
  document.body.append(canvas);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#16181d";
  ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#22252c";
  for (let x = 0; x < W; x += 20) ctx.strokeRect(x, BANNER, 0.5, H);
  for (let y = BANNER; y < H; y += 20) ctx.strokeRect(0, y, W, 0.5);

  const role = (type) => {
    if (/Note/.test(type)) return "#6b5d2e";
    if (/Loader|Download|LoadParams/.test(type)) return "#5b3f8c";
    if (/Text|Preset/.test(type)) return "#2f6b3f";
    if (/Sampler|FlowEdit|LongForm|StemGen$|Singing2Accompaniment/.test(type)) return "#2d5a9c";
    if (/Latent|Repaint|Extend|Audio2Audio|Encode/.test(type)) return "#276b6b";
    if (/Decode/.test(type)) return "#9c5a2d";
    if (/Save|Preview|LoadAudio/.test(type)) return "#5c5f66";
    return "#444a55";
  };
  const linkColour = { ACESTEP_MODEL: "#a07be0", ACESTEP_COND: "#6fcf7f", LATENT: "#ff9cf9", AUDIO: "#ffb050",
    ACESTEP_OPTIONS: "#8fb8ff", ACESTEP_STEMGEN: "#e0d07b" };

  const nodes = workflow.nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...nodes.map((n) => n.pos[1]));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const pad = 16;
  const scale = Math.min((W - 2 * pad) / (x1 - x0), (H - BANNER - 2 * pad) / (y1 - y0));
  const ox = pad + (W - 2 * pad - (x1 - x0) * scale) / 2;
  const oy = BANNER + pad + (H - BANNER - 2 * pad - (y1 - y0) * scale) / 2;
  const at = (x, y) => [ox + (x - x0) * scale, oy + (y - y0) * scale];
  const byId = new Map(nodes.map((n) => [n.id, n]));

  ctx.lineWidth = 2;
  for (const [, from, fromSlot, to, toSlot, type] of workflow.links) {
    const a = byId.get(from);
    const b = byId.get(to);
    if (!a || !b) continue;
    const [ax, ay] = at(a.pos[0] + a.size[0], a.pos[1] + 20 + 20 * fromSlot);
    const [bx, by] = at(b.pos[0], b.pos[1] + 20 + 20 * toSlot);
    const bend = Math.max(20, (bx - ax) / 2);
    ctx.strokeStyle = linkColour[type] ?? "#aaaaaa";
    ctx.beginPath();
    ctx.moveTo(ax, ay);
    ctx.bezierCurveTo(ax + bend, ay, bx - bend, by, bx, by);
    ctx.stroke();
  }
  for (const node of nodes) {
    const [x, y] = at(node.pos[0], node.pos[1]);
    const w = node.size[0] * scale;
    const h = node.size[1] * scale;
    const bar = Math.max(10, 30 * scale);
    ctx.fillStyle = "#2a2d34";
    ctx.fillRect(x, y, w, h);
    ctx.fillStyle = role(node.type);
    ctx.fillRect(x, y, w, bar);
    ctx.strokeStyle = "#0c0d10";
    ctx.lineWidth = 1;
    ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
    const label = (node.title ?? node.type).replace(/^ACE-Step /, "");
    ctx.fillStyle = "#f0f0f0";
    ctx.font = `${Math.max(8, Math.min(13, bar - 3))}px sans-serif`;
    ctx.save();
    ctx.beginPath();
    ctx.rect(x + 2, y, w - 4, bar);
    ctx.clip();
    ctx.fillText(label, x + 4, y + bar * 0.75);
    ctx.restore();
  }

  ctx.fillStyle = "#0e1014";
  ctx.fillRect(0, 0, W, BANNER);
  ctx.fillStyle = "#ffb050";
  ctx.fillRect(0, BANNER - 3, W, 3);
  ctx.fillStyle = "#9aa3b5";
  ctx.font = "bold 14px sans-serif";
  ctx.fillText("ACE-Step", 16, 24);
  ctx.fillStyle = "#ffffff";
  ctx.font = "bold 24px sans-serif";
  ctx.fillText(title.replace(/^ACE-Step - /, ""), 16, 52, W - 32);
}

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: WIDTH, height: HEIGHT } });
  for (const file of readdirSync(EXAMPLES).filter((f) => f.endsWith(".json")).sort()) {
    const workflow = JSON.parse(readFileSync(path.join(EXAMPLES, file), "utf8"));
    const title = file.slice(0, -".json".length);
    await page.setContent("<!doctype html><body style='margin:0;background:#000'></body>");
    await page.evaluate(([fn, wf, t]) => new Function(`return (${fn})`)()(wf, t), [draw.toString(), workflow, title]);
    const jpeg = await page.locator("canvas").screenshot({ type: "jpeg", quality: 85 });
    writeFileSync(path.join(EXAMPLES, `${title}.jpg`), jpeg);
    console.log(`${title}.jpg (${jpeg.length} bytes)`);
  }
} finally {
  await browser.close();
}
