// Pure logic of the waveform region picker (no DOM, no ComfyUI), shared by
// web/js/waveform_region.js and the node tests in tests/js/.
//
// Time is in seconds on one "timeline" whose 0 is the start of the source audio.
// A region is {start, end} on that timeline:
//   repaint: start = start_seconds, end = end_seconds          (inside [0, duration])
//   extend:  start = -left_seconds, end = duration + right_seconds (outside the source)
// Bounds are {lo, hi, duration}: the region may not leave [lo, hi].

export const SNAP_SECONDS = 0.01;

/** Round away floating-point noise (1e-6 s is far below one audio frame) and -0. */
export function tidy(seconds) {
  return Math.round(seconds * 1e6) / 1e6 + 0;
}

export function clamp(value, lo, hi) {
  return Math.min(Math.max(value, lo), hi);
}

/** Nearest multiple of `step`. */
export function snap(seconds, step = SNAP_SECONDS) {
  return tidy(Math.round(seconds / step) * step);
}

/** Snap to the grid, then clamp to the grid points inside [lo, hi]. */
export function snapClamp(seconds, lo, hi, step = SNAP_SECONDS) {
  const gridLo = Math.ceil(tidy(lo / step)) * step;
  const gridHi = Math.floor(tidy(hi / step)) * step;
  return tidy(clamp(Math.round(seconds / step) * step, gridLo, gridHi));
}

/**
 * Min/max envelope of the samples: `buckets` columns, each the extreme values over
 * its slice of samples, taken across all channels (Float32Array each, same length).
 */
export function computePeaks(channels, buckets) {
  const count = Math.max(1, Math.floor(buckets));
  const min = new Float32Array(count);
  const max = new Float32Array(count);
  const length = channels.length ? Math.min(...channels.map((c) => c.length)) : 0;
  if (length === 0) return { min, max };
  for (let b = 0; b < count; b++) {
    const from = Math.floor((b * length) / count);
    const to = Math.max(from + 1, Math.floor(((b + 1) * length) / count));
    let lo = Infinity;
    let hi = -Infinity;
    for (const channel of channels) {
      for (let i = from; i < to && i < length; i++) {
        const v = channel[i];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    min[b] = lo;
    max[b] = hi;
  }
  return { min, max };
}

/** Timeline seconds -> x pixel, for a view {t0, t1} drawn over [x0, x0 + width]. */
export function secondsToX(seconds, view, x0, width) {
  return x0 + ((seconds - view.t0) / (view.t1 - view.t0)) * width;
}

/** x pixel -> timeline seconds (inverse of secondsToX). */
export function xToSeconds(x, view, x0, width) {
  return view.t0 + ((x - x0) / width) * (view.t1 - view.t0);
}

/** The two widget values as a timeline region. */
export function regionFromValues(mode, a, b, duration) {
  if (mode === "extend") return { start: tidy(-a), end: tidy(duration + b) };
  return { start: a, end: b };
}

/** A timeline region as the two widget values (inverse of regionFromValues). */
export function valuesFromRegion(mode, region, duration) {
  if (mode === "extend") return [tidy(-region.start), tidy(region.end - duration)];
  return [region.start, region.end];
}

/**
 * Bounds of the region. repaint: [0, duration]; extend: up to maxA seconds before
 * and maxB seconds after the source. An unknown duration uses maxB as the end.
 */
export function regionBounds(mode, duration, maxA = Infinity, maxB = Infinity) {
  if (mode === "extend") return { lo: -maxA, hi: duration + maxB, duration };
  return { lo: 0, hi: Number.isFinite(duration) ? Math.min(duration, maxB) : maxB, duration };
}

/**
 * Time span to draw. repaint: the source. extend: the source plus room on each side
 * (a quarter of the source, or more than the current extension, at least 1 s).
 */
export function viewFor(mode, region, duration) {
  if (mode !== "extend") return { t0: 0, t1: duration };
  const left = Math.max(1, duration / 4, -region.start * 1.2);
  const right = Math.max(1, duration / 4, (region.end - duration) * 1.2);
  return { t0: -left, t1: duration + right };
}

/**
 * The region as it can be shown and dragged: ordered, inside the bounds, at least one
 * step wide (repaint), or with each edge on its side of the source (extend).
 */
export function normalizeRegion(mode, region, bounds, step = SNAP_SECONDS) {
  const { lo, hi, duration } = bounds;
  if (mode === "extend") {
    return { start: clamp(region.start, lo, 0), end: clamp(region.end, duration, hi) };
  }
  let start = clamp(Math.min(region.start, region.end), lo, hi);
  let end = clamp(Math.max(region.start, region.end), lo, hi);
  if (end - start < step) {
    if (start + step <= hi) end = tidy(start + step);
    else start = Math.max(lo, tidy(end - step));
  }
  return { start, end };
}

/** Warning for widget values the node would refuse or that look wrong, else null. */
export function checkValues(mode, a, b, duration) {
  if (!Number.isFinite(a) || !Number.isFinite(b)) return "values are not numbers";
  if (mode === "extend") {
    if (a < 0 || b < 0) return "extensions must be >= 0";
    if (a === 0 && b === 0) return "nothing to extend";
    return null;
  }
  if (a < 0) return "start must be >= 0";
  if (a >= b) return "start must be before end";
  if (Number.isFinite(duration) && b > duration + 1e-6)
    return `end is beyond the audio (${duration.toFixed(2)} s)`;
  return null;
}

/**
 * Start a drag at timeline time t. `tolerance` (seconds) is how close to an edge
 * grabs that edge. Returns the drag state for dragTo.
 * repaint: grab the nearest edge, move the region from inside it, or draw a new one.
 * extend: the left half of the source moves the left edge, the right half the right.
 */
export function beginDrag(mode, t, region, bounds, tolerance) {
  const base = { mode, region: { ...region }, bounds, tolerance, anchor: t };
  if (mode === "extend") return { ...base, kind: t < bounds.duration / 2 ? "start" : "end" };
  const toStart = Math.abs(t - region.start);
  const toEnd = Math.abs(t - region.end);
  if (Math.min(toStart, toEnd) <= tolerance) return { ...base, kind: toStart < toEnd ? "start" : "end" };
  if (t > region.start && t < region.end) return { ...base, kind: "move", offset: t - region.start };
  return { ...base, kind: "new" };
}

/**
 * The region for the pointer at timeline time t during `drag`, snapped and clamped,
 * or null when nothing should change (a click that has not moved yet, an empty region).
 */
export function dragTo(drag, t, step = SNAP_SECONDS) {
  const { region, bounds, mode, kind } = drag;
  const { lo, hi, duration } = bounds;
  if (hi - lo < step) return null;
  if (mode === "extend") {
    if (kind === "start") return { start: tidy(-snapClamp(-t, 0, -lo, step)), end: region.end };
    return { start: region.start, end: tidy(duration + snapClamp(t - duration, 0, hi - duration, step)) };
  }
  if (kind === "start") return { start: snapClamp(t, lo, region.end - step, step), end: region.end };
  if (kind === "end") return { start: region.start, end: snapClamp(t, region.start + step, hi, step) };
  if (kind === "move") {
    const length = region.end - region.start;
    const start = snapClamp(t - drag.offset, lo, hi - length, step);
    return { start, end: tidy(start + length) };
  }
  if (Math.abs(t - drag.anchor) < drag.tolerance) return null;
  const a = snapClamp(drag.anchor, lo, hi, step);
  const b = snapClamp(t, lo, hi, step);
  if (a === b) return null;
  return { start: Math.min(a, b), end: Math.max(a, b) };
}
