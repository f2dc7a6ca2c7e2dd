// Headless Chromium test of the extensions in the harness page (tests/js/harness*):
// renders the waveform widgets for synthetic sine files, checks pixels of the region,
// drags with the mouse and reads the number widgets back, and clicks the lyrics toolbar.
// Run: node tests/js/browser_check.mjs   (needs /usr/bin/chromium and npm's playwright-core;
// screenshots go to $ACESTEP_WEB_SCREENSHOTS or a temporary folder).
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { chromium } from "playwright-core";

import { startServer } from "./serve.mjs";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const SHOTS = process.env.ACESTEP_WEB_SCREENSHOTS ?? mkdtempSync(path.join(os.tmpdir(), "acestep-web-"));

// Layout of the waveform widget (web/js/waveform_region.js: width 400, margin 10,
// height 110 with an 18 px label row): the plot spans x 10..390 and y 4..88.
const PLOT = { x0: 10, width: 380, top: 4, mid: 46 };
const ABOVE_WAVE = 8;
const ON_WAVE = PLOT.mid - 10;
const REPAINT = "AceStepRepaintRegion";
const EXTEND = "AceStepExtend";

const isHighlight = ([r, , b]) => r > 90 && r > b + 50;
const isPlain = ([r, g, b]) => r < 60 && g < 60 && b < 60;
const isWave = ([r, , b]) => b > 200 && r < 140;

let server;
let browser;
let page;
const pageErrors = [];

/** x pixel of timeline time t for a view [t0, t1]. */
const xAt = (t, t0, t1) => PLOT.x0 + ((t - t0) / (t1 - t0)) * PLOT.width;
const repaintX = (t, duration = 3) => xAt(t, 0, duration);

const pixel = (node, x, y) => page.evaluate(([n, px, py]) => window.harness.pixel(n, px, py), [node, Math.round(x), y]);
const value = (node, widget) => page.evaluate(([n, w]) => window.harness.value(n, w), [node, widget]);

async function drag(node, fromX, toX, y = 30) {
  const box = await page.locator(`section[data-node="${node}"] canvas`).boundingBox();
  await page.mouse.move(box.x + fromX, box.y + y);
  await page.mouse.down();
  await page.mouse.move(box.x + (fromX + toX) / 2, box.y + y, { steps: 4 });
  await page.mouse.move(box.x + toX, box.y + y, { steps: 4 });
  await page.mouse.up();
}

function assertNear(actual, expected, tolerance, what) {
  assert.ok(Math.abs(actual - expected) <= tolerance, `${what}: ${actual} is not within ${tolerance} of ${expected}`);
}

function assertOnGrid(seconds, what) {
  assert.ok(Math.abs(seconds * 100 - Math.round(seconds * 100)) < 1e-6, `${what}: ${seconds} is not on the 0.01 s grid`);
}

describe("waveform region picker and lyrics helper in headless Chromium", () => {
  before(async () => {
    server = await startServer();
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"],
    });
    page = await browser.newPage({ viewport: { width: 600, height: 1200 } });
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    page.on("console", (message) => message.type() === "error" && pageErrors.push(message.text()));
    await page.goto(`${server.origin}/harness.html`);
    await page.waitForFunction(() => window.harness !== undefined);
    await page.evaluate(() => window.harness.ready);
    // The upstream LoadAudio file is fetched and decoded: the wave shows up right of the region.
    await page.waitForFunction(
      ([x, y]) => window.harness.pixel("AceStepRepaintRegion", x, y)[2] > 200,
      [Math.round(repaintX(2.7)), ON_WAVE],
      { timeout: 10000 },
    );
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  it("fetches the upstream LoadAudio file from /view with its subfolder", () => {
    assert.ok(server.requests.includes("/view?filename=sine.wav&subfolder=harness&type=input"), server.requests.join("\n"));
  });

  it("draws the region highlight inside the region only, and the waveform", async () => {
    assert.ok(isHighlight(await pixel(REPAINT, repaintX(1.5), ABOVE_WAVE)), "inside [1, 2]");
    assert.ok(isPlain(await pixel(REPAINT, repaintX(2.7), ABOVE_WAVE)), "outside [1, 2]");
    assert.ok(isPlain(await pixel(REPAINT, repaintX(0.5), ABOVE_WAVE)), "outside [1, 2]");
    assert.ok(isWave(await pixel(REPAINT, repaintX(2.7), ON_WAVE)), "waveform of the sine");
    await page.locator(`section[data-node="${REPAINT}"] canvas`).screenshot({ path: path.join(SHOTS, "repaint_region.png") });
  });

  it("dragging outside the region draws a new one and sets start/end on the 0.01 s grid", async () => {
    await drag(REPAINT, repaintX(0.5), repaintX(2.5));
    const [start, end] = [await value(REPAINT, "start_seconds"), await value(REPAINT, "end_seconds")];
    assertNear(start, 0.5, 0.015, "start");
    assertNear(end, 2.5, 0.015, "end");
    assertOnGrid(start, "start");
    assertOnGrid(end, "end");
    assert.ok(isHighlight(await pixel(REPAINT, repaintX(2.25), ABOVE_WAVE)), "new region drawn");
    assert.ok(isPlain(await pixel(REPAINT, repaintX(0.25), ABOVE_WAVE)), "left of the new region");
  });

  it("typing in the number widgets moves the highlight", async () => {
    await page.evaluate(() => {
      window.harness.type("AceStepRepaintRegion", "start_seconds", 2.6);
      window.harness.type("AceStepRepaintRegion", "end_seconds", 2.9);
    });
    assert.ok(isHighlight(await pixel(REPAINT, repaintX(2.75), ABOVE_WAVE)));
    assert.ok(isPlain(await pixel(REPAINT, repaintX(1.5), ABOVE_WAVE)));
  });

  it("dragging an edge past the end clamps it to the audio's duration", async () => {
    await drag(REPAINT, repaintX(2.9), 399);
    assert.equal(await value(REPAINT, "end_seconds"), 3);
    assert.equal(await value(REPAINT, "start_seconds"), 2.6);
  });

  it("dragging inside the region moves it whole", async () => {
    await drag(REPAINT, repaintX(2.8), repaintX(0.8));
    const [start, end] = [await value(REPAINT, "start_seconds"), await value(REPAINT, "end_seconds")];
    assertNear(start, 0.6, 0.015, "start");
    assertNear(end - start, 0.4, 1e-6, "length");
    await drag(REPAINT, repaintX(0.8), 0);
    assert.equal(await value(REPAINT, "start_seconds"), 0, "clamped at 0");
  });

  it("extend mode highlights the new audio outside the source and drags left/right", async () => {
    // left 0, right 1.5 on a 3 s source: the view is [-1, 4.8].
    const x = (t) => xAt(t, -1, 4.8);
    assert.ok(isHighlight(await pixel(EXTEND, x(4), ABOVE_WAVE)), "right extension");
    assert.ok(isPlain(await pixel(EXTEND, x(-0.5), ABOVE_WAVE)), "no left extension yet");
    assert.ok(isPlain(await pixel(EXTEND, x(1.5), ABOVE_WAVE)), "source itself");
    await page.locator(`section[data-node="${EXTEND}"] canvas`).screenshot({ path: path.join(SHOTS, "extend_region.png") });

    await drag(EXTEND, x(0.5), x(-0.8));
    const left = await value(EXTEND, "left_seconds");
    assertNear(left, 0.8, 0.02, "left_seconds");
    assertOnGrid(left, "left_seconds");
    assert.equal(await value(EXTEND, "right_seconds"), 1.5);
    await drag(EXTEND, 300, 399);
    await drag(EXTEND, 300, 399);
    assert.equal(await value(EXTEND, "right_seconds"), 2, "limited by the widget's max");
  });

  it("after a run, the audio named in the executed message's ui.audio replaces the editor's", async () => {
    await page.evaluate(() =>
      window.harness.executed("AceStepRepaintRegion", { audio: [{ filename: "run_source.wav", subfolder: "", type: "temp" }] }),
    );
    // start 0 .. end 0.4 on a 4 s source instead of 3 s: x 48 is inside only on the new scale.
    await page.waitForFunction(
      ([x, y]) => window.harness.pixel("AceStepRepaintRegion", x, y)[0] > 90,
      [Math.round(repaintX(0.37, 4)), ABOVE_WAVE],
      { timeout: 10000 },
    );
    assert.ok(server.requests.includes("/view?filename=run_source.wav&subfolder=&type=temp"));
    await drag(REPAINT, repaintX(0.4, 4), 399);
    assert.equal(await value(REPAINT, "end_seconds"), 4);
  });

  it("the picker widget is last and left out of the saved widget values and the prompt", async () => {
    const widgets = await page.evaluate(() => window.harness.widgets("AceStepRepaintRegion"));
    assert.deepEqual(widgets.map((w) => w.name), ["start_seconds", "end_seconds", "acestep_waveform"]);
    assert.equal(widgets[2].serialize, false);
    assert.equal(widgets[2].options, false);
  });

  it("the lyrics toolbar inserts tags on their own line and updates the status", async () => {
    const section = page.locator('section[data-node="AceStepTextEncode"]');
    const textarea = section.locator("textarea");
    await textarea.click();
    await page.keyboard.press("End");
    await section.locator("button", { hasText: "[chorus]" }).click();
    assert.equal(await textarea.inputValue(), "oh my love\n[chorus]\n");
    assert.match(await section.locator(".acestep-lyrics-status").textContent(), /^3 lines · 2 sections · untagged en, chorus – \(language guess\)$/);
    await textarea.fill("[Verse 1]\n你好\n[chorus]\nhello");
    assert.match(await section.locator(".acestep-lyrics-status").textContent(), /2 sections · Verse 1 zh, chorus en/);
    assert.match(await section.locator(".acestep-lyrics-warning").textContent(), /\[Verse 1\] is not a structure tag.*use \[verse\]/);
  });

  it("the toolbar goes on every lyrics widget of our nodes and on no one else's", async () => {
    assert.equal(await page.locator('section[data-node="AceStepFlowEdit"] .acestep-lyrics-tools').count(), 2);
    const labels = await page.locator('section[data-node="AceStepFlowEdit"] .acestep-lyrics-tools span').allTextContents();
    assert.deepEqual(labels, ["lyrics:", "target_lyrics:"]);
    assert.equal(await page.locator('section[data-node="SomeoneElsesNode"] .acestep-lyrics-tools').count(), 0);
  });

  it("at the default node width every toolbar button is visible (they wrap) and the widget is tall enough", async () => {
    for (const node of ["AceStepTextEncode", "AceStepFlowEdit"]) {
      for (const root of await page.locator(`section[data-node="${node}"] .acestep-lyrics-tools`).all()) {
        // a DOM widget gets the node's width less the editor's margins (400 - 2 x 10 px)
        await root.evaluate((el) => { el.style.width = "380px"; });
        const box = await root.boundingBox();
        const buttons = await root.locator("button").all();
        assert.equal(buttons.length, 10);
        for (const button of buttons) {
          const b = await button.boundingBox();
          const name = await button.textContent();
          assert.ok(b.x >= box.x && b.x + b.width <= box.x + box.width + 0.5, `${node} ${name} is cut off horizontally`);
          assert.ok(b.y + b.height <= box.y + box.height + 0.5, `${node} ${name} is below the toolbar`);
        }
        assert.ok(await root.evaluate((el) => el.scrollWidth <= el.clientWidth), `${node}: the toolbar scrolls sideways`);
      }
      const name = node === "AceStepTextEncode" ? "acestep_lyrics_tools" : "acestep_target_lyrics_tools";
      const [min, max] = await page.evaluate(([n, w]) => window.harness.domHeight(n, w), [node, name]);
      const needed = await page.locator(`section[data-node="${node}"] .acestep-lyrics-tools`).last()
        .evaluate((el) => el.scrollHeight);
      assert.ok(min >= needed && max === min, `${node}: widget asks ${min}-${max} px, the toolbar needs ${needed}`);
    }
    await page.screenshot({ path: path.join(SHOTS, "lyrics_toolbar.png") });
  });

  it("Load Params has an upload button that stores a JSON file and selects it", async () => {
    const section = page.locator('section[data-node="AceStepLoadParams"]');
    const chooser = page.waitForEvent("filechooser");
    await section.locator('button[data-widget="upload params file"]').click();
    await (await chooser).setFiles({ name: "song_input_params.json", mimeType: "application/json",
      buffer: Buffer.from(JSON.stringify({ prompt: "pop", lyrics: "", actual_seeds: [1] })) });
    for (let i = 0; i < 100 && server.uploads.length === 0; i++) await page.waitForTimeout(50);
    assert.equal(server.uploads.length, 1);
    assert.equal(server.uploads[0].name, "song_input_params.json");
    assert.match(server.uploads[0].body, /name="type"\r\n\r\ninput/);
    for (let i = 0; i < 100 && (await value("AceStepLoadParams", "params_file")) !== "song_input_params.json"; i++) {
      await page.waitForTimeout(50);
    }
    assert.equal(await value("AceStepLoadParams", "params_file"), "song_input_params.json");
  });

  it("choosing a file that cannot be read drops the old waveform without throwing", async () => {
    await page.evaluate(() => window.harness.chooseFile("missing.wav"));
    const route = "/view?filename=missing.wav&subfolder=&type=input";
    for (let i = 0; i < 100 && !server.requests.includes(route); i++) await page.waitForTimeout(50);
    assert.ok(server.requests.includes(route), "the new file is fetched");
    await page.waitForTimeout(200);
    await page.evaluate(() => window.harness.render());
    assert.ok(!isWave(await pixel(REPAINT, repaintX(3.5, 4), ON_WAVE)), "no stale waveform");
    assert.ok(isHighlight(await pixel(REPAINT, PLOT.x0 + 1, ABOVE_WAVE)), "the region is still drawn");
  });

  it("the Text Encode 1.5 fields show only for a 1.5 loader and keep their values and places when hidden", async () => {
    const fields = () => page.evaluate(() => window.harness.v15Fields());
    const link = (name) => page.evaluate((n) => window.harness.linkModel(n), name);
    const set = (name, value) => page.evaluate(([n, v]) => window.harness.setLoader(n, v), [name, value]);
    const values = [["bpm", 96], ["keyscale", "C major"], ["timesignature", "3"], ["language", "de"]];
    const expect = (hidden, what) => async () => {
      const now = await fields();
      assert.deepEqual(now.map((f) => [f.name, f.value]), values, `${what}: names and values in place`);
      for (const f of now) {
        assert.equal(f.hidden, hidden, `${what}: ${f.name} hidden`);
        if (hidden) assert.equal(f.height, -4, `${what}: ${f.name} takes no room`);
        else assert.ok(f.height === null || f.height > 0, `${what}: ${f.name} has its height back`);
      }
    };
    await expect(false, "unlinked (family unknown)")();
    await link("AceStepLoraLoader");
    await expect(true, "a v1 checkpoint through a LoRA loader")();
    await set("checkpoint", "Ace-Step1.5");
    await expect(false, "a 1.5 checkpoint")();
    await set("checkpoint", "acestep-v1-tiny");
    await link("AceStepLoader");
    await expect(true, "a v1 checkpoint linked directly")();
    await set("repo_id", "ACE-Step/Ace-Step1.5");
    await expect(false, "a 1.5 repo id over a v1 checkpoint")();
    await set("repo_id", "");
    await expect(true, "repo id cleared")();
    await link(null);
    await expect(false, "unlinked again")();
  });

  it("raised no page errors", async () => {
    assert.deepEqual(await page.evaluate(() => window.harness.errors), []);
    assert.deepEqual(pageErrors.filter((e) => !e.includes("404")), []);
    console.log(`screenshots: ${SHOTS}`);
  });
});
