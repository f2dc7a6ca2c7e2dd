// Where the waveform picker fetches its audio from.
import assert from "node:assert/strict";
import test from "node:test";

import { executedAudioFile, parseFileValue, viewRoute } from "../../web/js/lib/source.js";

test("file widget values split into name, subfolder and folder type", () => {
  assert.deepEqual(parseFileValue("song.wav"), { filename: "song.wav", subfolder: "", type: "input" });
  assert.deepEqual(parseFileValue("a/b/song.flac"), { filename: "song.flac", subfolder: "a/b", type: "input" });
  assert.deepEqual(parseFileValue("x.mp3 [output]"), { filename: "x.mp3", subfolder: "", type: "output" });
  assert.deepEqual(parseFileValue("t/x.mp3 [temp]"), { filename: "x.mp3", subfolder: "t", type: "temp" });
});

test("the view route carries every part, URL-encoded", () => {
  const route = viewRoute({ filename: "my song&1.wav", subfolder: "a b", type: "input" });
  assert.ok(route.startsWith("/view?"));
  const query = new URLSearchParams(route.slice("/view?".length));
  assert.equal(query.get("filename"), "my song&1.wav");
  assert.equal(query.get("subfolder"), "a b");
  assert.equal(query.get("type"), "input");
});

test("the executed message's ui.audio entry is read, anything else is ignored", () => {
  const output = { audio: [{ filename: "src_00001_.flac", subfolder: "acestep", type: "temp" }] };
  assert.deepEqual(executedAudioFile(output), { filename: "src_00001_.flac", subfolder: "acestep", type: "temp" });
  assert.deepEqual(executedAudioFile({ audio: [{ filename: "a.wav" }] }), { filename: "a.wav", subfolder: "", type: "output" });
  assert.equal(executedAudioFile(undefined), null);
  assert.equal(executedAudioFile({ images: [] }), null);
  assert.equal(executedAudioFile({ audio: [] }), null);
  assert.equal(executedAudioFile({ audio: [{ subfolder: "x" }] }), null);
});
