// Pure logic of the lyrics helper: tag insertion, parsing into sections, the language
// guess and the warnings for tags the lyric vocabulary does not know.
import assert from "node:assert/strict";
import test from "node:test";

import {
  KNOWN_TAGS, TOOLBAR_TAGS, analyzeLyrics, describeWarnings, guessLanguage, insertTag, suggestTag, summarize,
} from "../../web/js/lib/lyrics.js";

test("the toolbar only offers tags the vocabulary knows", () => {
  for (const tag of TOOLBAR_TAGS) assert.ok(KNOWN_TAGS.includes(tag), tag);
  assert.equal(KNOWN_TAGS.length, 12);
});

test("a tag goes on a line of its own wherever the cursor is", () => {
  assert.deepEqual(insertTag("", 0, "verse"), { text: "[verse]\n", cursor: 8 });
  assert.deepEqual(insertTag("la la", 5, "chorus"), { text: "la la\n[chorus]\n", cursor: 15 });
  assert.deepEqual(insertTag("ab\ncd", 3, "bridge"), { text: "ab\n[bridge]\ncd", cursor: 12 });
  assert.deepEqual(insertTag("abcd", 2, "hook"), { text: "ab\n[hook]\ncd", cursor: 10 });
  assert.deepEqual(insertTag("ab", undefined, "inst"), { text: "ab\n[inst]\n", cursor: 10 });
  assert.deepEqual(insertTag("ab", 99, "solo"), { text: "ab\n[solo]\n", cursor: 10 }, "cursor past the end");
});

test("inserted tags are read back as sections at the right lines", () => {
  let text = "";
  let cursor = 0;
  for (const tag of ["intro", "verse", "pre-chorus", "chorus", "outro"]) {
    ({ text, cursor } = insertTag(text, cursor, tag));
    text = `${text.slice(0, cursor)}words\n${text.slice(cursor)}`;
    cursor += "words\n".length;
  }
  const analysis = analyzeLyrics(text);
  assert.deepEqual(analysis.sections.map((s) => s.tag), ["intro", "verse", "pre-chorus", "chorus", "outro"]);
  assert.deepEqual(analysis.sections.map((s) => s.line), [1, 3, 5, 7, 9]);
  assert.deepEqual(analysis.unknownTags, []);
});

test("lines, sections and per-section languages of mixed lyrics", () => {
  const text = "hello there\n[verse]\nNeon lights they flicker bright\n\n[chorus]\n你好世界\n[bridge]\nこんにちは 世界\n[outro]";
  const analysis = analyzeLyrics(text);
  assert.equal(analysis.lineCount, 9);
  assert.deepEqual(
    analysis.sections.map((s) => [s.tag, s.line, s.language]),
    [[null, 1, "en"], ["verse", 2, "en"], ["chorus", 5, "zh"], ["bridge", 7, "ja"], ["outro", 9, null]],
  );
  const summary = summarize(analysis);
  assert.match(summary, /^9 lines · 5 sections · /);
  assert.match(summary, /untagged en, verse en, chorus zh, bridge ja, outro –/);
  assert.match(summary, /guess/);
});

test("empty lyrics have no lines and no sections", () => {
  const analysis = analyzeLyrics("");
  assert.equal(analysis.lineCount, 0);
  assert.deepEqual(analysis.sections, []);
  assert.equal(summarize(analysis), "0 lines · 0 sections");
});

test("the language guess follows the script", () => {
  assert.equal(guessLanguage("我爱你"), "zh");
  assert.equal(guessLanguage("愛してる ずっと"), "ja", "kana marks Japanese even next to Han");
  assert.equal(guessLanguage("사랑해요"), "ko");
  assert.equal(guessLanguage("Я тебя люблю"), "ru");
  assert.equal(guessLanguage("मैं तुमसे प्यार करता हूँ"), "hi");
  assert.equal(guessLanguage("أحبك كثيرا"), "ar");
  assert.equal(guessLanguage("I will love you till the end"), "en");
  assert.equal(guessLanguage("123 !!"), null);
});

test("Latin-script languages are told apart by common words and letters", () => {
  assert.equal(guessLanguage("Ich liebe dich und du bist nicht allein"), "de");
  assert.equal(guessLanguage("Je t'aime et tu es là, mon cœur"), "fr");
  assert.equal(guessLanguage("Yo te quiero, mi corazón es tuyo por siempre"), "es");
  assert.equal(guessLanguage("Eu te amo, você é o meu coração"), "pt");
});

test("a non-Latin script next to mostly Latin text wins, as in the backend", () => {
  assert.equal(guessLanguage("baby baby baby oh 爱"), "zh");
});

test("unknown tags are reported with their line and the tag they probably meant", () => {
  const text = "[Verse 1]\nla\n[chorus]\n[Pre Chorus]\n[instrumental]\n[drop]\n[verse]";
  const { unknownTags } = analyzeLyrics(text);
  assert.deepEqual(unknownTags, [
    { tag: "[Verse 1]", line: 1, suggestion: "verse" },
    { tag: "[Pre Chorus]", line: 4, suggestion: "pre-chorus" },
    { tag: "[instrumental]", line: 5, suggestion: "inst" },
    { tag: "[drop]", line: 6, suggestion: null },
  ]);
  const warnings = describeWarnings(analyzeLyrics(text));
  assert.equal(warnings.length, 4);
  assert.match(warnings[0], /^line 1: \[Verse 1\] is not a structure tag.*use \[verse\]$/);
  assert.match(warnings[3], /known: start intro verse/);
});

test("case does not matter (lines are lowercased before tokenising), spelling does", () => {
  assert.deepEqual(analyzeLyrics("[CHORUS]\n[Verse]\n[pre-chorus]\n[start]\n[end]").unknownTags, []);
  assert.deepEqual(analyzeLyrics("[Pre Chorus]").unknownTags, [{ tag: "[Pre Chorus]", line: 1, suggestion: "pre-chorus" }]);
  assert.equal(suggestTag("Chorus 2"), "chorus");
});

test("non-English words after a leading tag are flagged, English ones are not", () => {
  const analysis = analyzeLyrics("[verse] 我爱你\n[chorus] oh yeah");
  assert.deepEqual(analysis.textAfterTag, [{ tag: "[verse]", line: 1, language: "zh" }]);
  const warnings = describeWarnings(analysis);
  assert.deepEqual(warnings, ["line 1: words after [verse] are read as English, not zh; start them on the next line"]);
});
