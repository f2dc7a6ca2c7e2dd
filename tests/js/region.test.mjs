// Pure logic of the waveform region picker: peaks, pixel <-> seconds, snapping,
// clamping, the drag state machine and the widget <-> region mapping (both modes).
import assert from "node:assert/strict";
import test from "node:test";

import {
  SNAP_SECONDS, beginDrag, checkValues, computePeaks, dragTo, normalizeRegion, regionBounds,
  regionFromValues, secondsToX, snap, snapClamp, valuesFromRegion, viewFor, xToSeconds,
} from "../../web/js/lib/region.js";

function sine(seconds, rate, hz, amplitude) {
  const out = new Float32Array(Math.round(seconds * rate));
  for (let i = 0; i < out.length; i++) out[i] = amplitude * Math.sin((2 * Math.PI * hz * i) / rate);
  return out;
}

function isOnGrid(seconds) {
  return Math.abs(seconds / SNAP_SECONDS - Math.round(seconds / SNAP_SECONDS)) < 1e-6;
}

test("peaks of a sine reach its amplitude in every column", () => {
  const { min, max } = computePeaks([sine(2, 8000, 50, 0.5)], 100);
  assert.equal(min.length, 100);
  for (let b = 0; b < 100; b++) {
    assert.ok(Math.abs(max[b] - 0.5) < 1e-3, `column ${b} max ${max[b]}`);
    assert.ok(Math.abs(min[b] + 0.5) < 1e-3, `column ${b} min ${min[b]}`);
  }
});

test("peaks follow the loud part of the signal and take every channel", () => {
  const left = new Float32Array(1000);
  const right = new Float32Array(1000);
  left.fill(0.9, 0, 250);
  right.fill(-0.7, 750, 1000);
  const { min, max } = computePeaks([left, right], 4);
  assert.deepEqual(Array.from(max), [Math.fround(0.9), 0, 0, 0]);
  assert.deepEqual(Array.from(min), [0, 0, 0, Math.fround(-0.7)]);
});

test("peaks with more columns than samples repeat samples instead of leaving gaps", () => {
  const { min, max } = computePeaks([new Float32Array([0.25, -0.5, 1])], 7);
  assert.equal(max.length, 7);
  for (let b = 0; b < 7; b++) assert.ok(Number.isFinite(min[b]) && Number.isFinite(max[b]));
  assert.equal(max[6], 1);
  assert.equal(min[0], 0.25);
});

test("peaks of empty audio are silent columns", () => {
  const { min, max } = computePeaks([], 5);
  assert.deepEqual(Array.from(min), [0, 0, 0, 0, 0]);
  assert.deepEqual(Array.from(max), [0, 0, 0, 0, 0]);
});

test("seconds -> pixels -> seconds is the identity and the view ends land on the plot ends", () => {
  const view = { t0: -2.5, t1: 12.5 };
  assert.equal(secondsToX(-2.5, view, 10, 300), 10);
  assert.equal(secondsToX(12.5, view, 10, 300), 310);
  for (const t of [-2.5, -1, 0, 3.33, 10, 12.5]) {
    assert.ok(Math.abs(xToSeconds(secondsToX(t, view, 10, 300), view, 10, 300) - t) < 1e-9);
  }
});

test("snapping lands on the 0.01 s grid and clamping keeps grid points inside the bounds", () => {
  assert.equal(snap(1.234), 1.23);
  assert.equal(snap(1.235 + 1e-9), 1.24);
  assert.equal(snap(0.1 + 0.2), 0.3);
  assert.equal(snapClamp(-3, 0, 10), 0);
  assert.equal(snapClamp(10.004, 0, 10.005), 10);
  assert.equal(snapClamp(99, 0, 10.005), 10, "never above a bound that is off the grid");
  assert.equal(snapClamp(-0.004, -0.005, 5), 0);
});

test("repaint: widget values and the region are the same numbers", () => {
  const region = regionFromValues("repaint", 1.5, 4.25, 10);
  assert.deepEqual(region, { start: 1.5, end: 4.25 });
  assert.deepEqual(valuesFromRegion("repaint", region, 10), [1.5, 4.25]);
});

test("extend: left/right widgets map to a region outside the source and back", () => {
  const region = regionFromValues("extend", 2, 30, 10);
  assert.deepEqual(region, { start: -2, end: 40 });
  assert.deepEqual(valuesFromRegion("extend", region, 10), [2, 30]);
  const view = viewFor("extend", region, 10);
  assert.ok(view.t0 < -2 && view.t1 > 40, "both extensions are visible");
  assert.ok(view.t0 < 0 && view.t1 > 10, "room is left on both sides of the source");
  assert.deepEqual(viewFor("repaint", { start: 1, end: 2 }, 10), { t0: 0, t1: 10 });
});

test("repaint drag: grabbing an edge moves only that edge, snapped and clamped", () => {
  const bounds = regionBounds("repaint", 10);
  const region = { start: 2, end: 5 };
  const grabStart = beginDrag("repaint", 2.03, region, bounds, 0.1);
  assert.equal(grabStart.kind, "start");
  assert.deepEqual(dragTo(grabStart, 1.234), { start: 1.23, end: 5 });
  assert.deepEqual(dragTo(grabStart, -4), { start: 0, end: 5 });
  assert.deepEqual(dragTo(grabStart, 7), { start: 4.99, end: 5 }, "start stays before end");
  const grabEnd = beginDrag("repaint", 4.95, region, bounds, 0.1);
  assert.equal(grabEnd.kind, "end");
  assert.deepEqual(dragTo(grabEnd, 12), { start: 2, end: 10 });
  assert.deepEqual(dragTo(grabEnd, 0), { start: 2, end: 2.01 });
});

test("repaint drag: inside the region moves it whole, keeping its length, inside the audio", () => {
  const bounds = regionBounds("repaint", 10);
  const drag = beginDrag("repaint", 3, { start: 2, end: 5 }, bounds, 0.1);
  assert.equal(drag.kind, "move");
  assert.deepEqual(dragTo(drag, 4.5), { start: 3.5, end: 6.5 });
  assert.deepEqual(dragTo(drag, 100), { start: 7, end: 10 });
  assert.deepEqual(dragTo(drag, -100), { start: 0, end: 3 });
});

test("repaint drag: outside the region draws a new one in either direction, not on a click", () => {
  const bounds = regionBounds("repaint", 10);
  const drag = beginDrag("repaint", 8, { start: 2, end: 5 }, bounds, 0.1);
  assert.equal(drag.kind, "new");
  assert.equal(dragTo(drag, 8.05), null, "a click that has not moved changes nothing");
  assert.deepEqual(dragTo(drag, 9.456), { start: 8, end: 9.46 });
  assert.deepEqual(dragTo(drag, 6.5), { start: 6.5, end: 8 });
  assert.deepEqual(dragTo(drag, 30), { start: 8, end: 10 });
});

test("every repaint drag result is on the grid, ordered and inside [0, duration]", () => {
  const duration = 7.777;
  const bounds = regionBounds("repaint", duration);
  const region = { start: 1.111, end: 3.333 };
  for (const at of [0.5, 1.111, 2, 3.333, 6]) {
    const drag = beginDrag("repaint", at, region, bounds, 0.05);
    for (let t = -3; t <= 11; t += 0.137) {
      const next = dragTo(drag, t);
      if (!next) continue;
      assert.ok(next.start >= 0 && next.end <= duration && next.start < next.end, JSON.stringify(next));
      if (drag.kind === "start" || drag.kind === "new") assert.ok(isOnGrid(next.start), `${next.start}`);
      if (drag.kind === "end" || drag.kind === "new") assert.ok(isOnGrid(next.end), `${next.end}`);
    }
  }
});

test("repaint without a known duration clamps to the widget maximum", () => {
  const bounds = regionBounds("repaint", undefined, Infinity, 240);
  const drag = beginDrag("repaint", 5, { start: 0, end: 5 }, bounds, 0.1);
  assert.deepEqual(dragTo(drag, 500), { start: 0, end: 240 });
});

test("extend drag: the left half sets left_seconds, the right half right_seconds", () => {
  const duration = 10;
  const bounds = regionBounds("extend", duration, 20, 30);
  const region = regionFromValues("extend", 0, 5, duration);
  const left = beginDrag("extend", 2, region, bounds, 0.1);
  assert.equal(left.kind, "start");
  assert.deepEqual(valuesFromRegion("extend", dragTo(left, -3.456), duration), [3.46, 5]);
  assert.deepEqual(valuesFromRegion("extend", dragTo(left, 4), duration), [0, 5], "never inside the source");
  assert.deepEqual(valuesFromRegion("extend", dragTo(left, -99), duration), [20, 5], "limited by the widget max");
  const right = beginDrag("extend", 8, region, bounds, 0.1);
  assert.equal(right.kind, "end");
  assert.deepEqual(valuesFromRegion("extend", dragTo(right, 17.891), duration), [0, 7.89]);
  assert.deepEqual(valuesFromRegion("extend", dragTo(right, 99), duration), [0, 30]);
  assert.deepEqual(valuesFromRegion("extend", dragTo(right, 3), duration), [0, 0]);
});

test("extend values are snapped even when the source length is off the grid", () => {
  const duration = 9.8765;
  const bounds = regionBounds("extend", duration, 60, 60);
  const drag = beginDrag("extend", 9, regionFromValues("extend", 0, 0, duration), bounds, 0.1);
  const [, right] = valuesFromRegion("extend", dragTo(drag, 15.55555), duration);
  assert.ok(isOnGrid(right), `${right}`);
  assert.ok(Math.abs(right - 5.68) < 1e-9, `${right}`);
});

test("typed values are shown ordered, clamped and at least one step wide", () => {
  const bounds = regionBounds("repaint", 10);
  assert.deepEqual(normalizeRegion("repaint", { start: 6, end: 3 }, bounds), { start: 3, end: 6 });
  assert.deepEqual(normalizeRegion("repaint", { start: 4, end: 50 }, bounds), { start: 4, end: 10 });
  assert.deepEqual(normalizeRegion("repaint", { start: 10, end: 10 }, bounds), { start: 9.99, end: 10 });
  const extend = regionBounds("extend", 10, 20, 20);
  assert.deepEqual(normalizeRegion("extend", { start: 3, end: 45 }, extend), { start: 0, end: 30 });
});

test("value checks explain what is wrong", () => {
  assert.equal(checkValues("repaint", 1, 2, 10), null);
  assert.match(checkValues("repaint", 3, 2, 10), /before end/);
  assert.match(checkValues("repaint", 1, 12, 10), /beyond the audio/);
  assert.match(checkValues("repaint", -1, 2, 10), />= 0/);
  assert.equal(checkValues("repaint", 1, 12, undefined), null, "unknown duration: no length check");
  assert.equal(checkValues("extend", 0, 30, 10), null);
  assert.match(checkValues("extend", 0, 0, 10), /nothing to extend/);
  assert.match(checkValues("extend", -1, 3, 10), />= 0/);
});
