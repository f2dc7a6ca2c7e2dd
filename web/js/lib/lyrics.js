// Pure logic of the lyrics helper (no DOM, no ComfyUI), shared by
// web/js/lyrics_helper.js and the node tests in tests/js/.
//
// Structure tags are tokens of the lyric vocabulary (design §5.1). A line is lowercased
// before tokenising (design §5.4), so [Verse] works, but any other [bracket] text, such as
// [verse 1], is read by the model as [UNK] plus letters.
// The language guess is a light script/word heuristic for the editor only; the
// backend detects the language of every line itself (design §5.3).

export const KNOWN_TAGS = [
  "start", "intro", "verse", "chorus", "bridge", "outro",
  "end", "inst", "solo", "hook", "pre-chorus", "break",
];

export const TOOLBAR_TAGS = [
  "verse", "chorus", "bridge", "intro", "outro", "pre-chorus", "hook", "inst", "solo", "break",
];

const ALIASES = { instrumental: "inst", prechorus: "pre-chorus", refrain: "chorus", interlude: "break" };

/** The known tag an unknown one most likely meant, e.g. "Verse 1" -> "verse", else null. */
export function suggestTag(inner) {
  const word = inner.toLowerCase().replace(/[0-9:#.]+/g, " ").trim().replace(/[\s_]+/g, "-");
  const name = ALIASES[word.replace(/-/g, "")] ?? word;
  return KNOWN_TAGS.includes(name) ? name : null;
}

/**
 * Insert "[tag]" at `cursor` on a line of its own: a line break is added before it
 * unless the cursor starts a line, and after it always. Returns {text, cursor}, the
 * cursor just after the inserted line.
 */
export function insertTag(text, cursor, tag) {
  const at = clamp(cursor ?? text.length, 0, text.length);
  const before = text.slice(0, at);
  const lead = before === "" || before.endsWith("\n") ? "" : "\n";
  const inserted = `${lead}[${tag}]\n`;
  return { text: before + inserted + text.slice(at), cursor: at + inserted.length };
}

function clamp(value, lo, hi) {
  return Math.min(Math.max(value, lo), hi);
}

const SCRIPTS = [
  ["kana", /[\p{Script=Hiragana}\p{Script=Katakana}]/u],
  ["han", /\p{Script=Han}/u],
  ["hangul", /\p{Script=Hangul}/u],
  ["cyrillic", /\p{Script=Cyrillic}/u],
  ["devanagari", /\p{Script=Devanagari}/u],
  ["arabic", /\p{Script=Arabic}/u],
  ["latin", /\p{Script=Latin}/u],
];

const SCRIPT_LANGUAGE = { han: "zh", hangul: "ko", cyrillic: "ru", devanagari: "hi", arabic: "ar" };

// A few frequent words and distinctive letters per Latin-script language.
const LATIN_HINTS = {
  en: { words: "the and you i my is in of to me it your we love", letters: "" },
  de: { words: "der die das und ich du nicht ist ein mein mit wir", letters: "äöüß" },
  fr: { words: "le la les et je tu de un une est pas mon moi nous", letters: "çéèêëàâîôœù" },
  es: { words: "el la que y de mi tu no en los las yo por amor", letters: "ñáéíóú¿¡" },
  it: { words: "il la che e di non un sono mi per io ti amore", letters: "àèéìòù" },
  pt: { words: "o a que e de não um eu você meu com para", letters: "ãõçáâêô" },
  nl: { words: "de het een en ik je niet van is dat wij mijn", letters: "" },
  pl: { words: "i w nie na się to jest że ja ty", letters: "ąćęłńśźż" },
  tr: { words: "bir ve bu ben sen çok ne için", letters: "ğış" },
  cs: { words: "a je to se na že jsem ty já", letters: "ěščřžůý" },
  hu: { words: "a az és nem egy hogy én te", letters: "őű" },
};

function guessLatin(text) {
  const lower = text.toLowerCase();
  const words = lower.match(/\p{L}+/gu) ?? [];
  let best = "en";
  let bestScore = 0;
  for (const [lang, hints] of Object.entries(LATIN_HINTS)) {
    const vocabulary = new Set(hints.words.split(" "));
    let score = words.filter((w) => vocabulary.has(w)).length;
    for (const letter of hints.letters) if (lower.includes(letter)) score += 2;
    if (score > bestScore) [best, bestScore] = [lang, score];
  }
  return best;
}

/**
 * Guess the language of a piece of lyrics from its scripts: kana -> ja, Han -> zh,
 * Hangul -> ko, Cyrillic -> ru, Devanagari -> hi, Arabic -> ar, Latin -> en/de/fr/...
 * by common words and letters. Like the backend, a non-Latin script present next to
 * mostly Latin text wins. Returns null when there are no letters of these scripts.
 */
export function guessLanguage(text) {
  const counts = {};
  for (const char of text) {
    const hit = SCRIPTS.find(([, pattern]) => pattern.test(char));
    if (hit) counts[hit[0]] = (counts[hit[0]] ?? 0) + 1;
  }
  if (counts.kana) return "ja";
  const ranked = Object.keys(counts).sort((a, b) => counts[b] - counts[a]);
  const top = ranked.find((script) => script !== "latin") ?? ranked[0];
  if (!top) return null;
  return top === "latin" ? guessLatin(text) : SCRIPT_LANGUAGE[top];
}

/**
 * Read lyrics for the editor: line count, sections (a line starting with a [tag]
 * opens one; text before the first tag is an untagged section), the guessed language
 * of each section, every unknown [tag] with its line (1-based) and a suggestion, and
 * the lines with non-English words after their leading tag (the tokenizer reads a
 * line that starts with a tag as English, design §5.2 step 4).
 */
export function analyzeLyrics(text) {
  const lines = text === "" ? [] : text.split("\n");
  const sections = [];
  const unknownTags = [];
  const textAfterTag = [];
  let current = null;
  lines.forEach((raw, index) => {
    const line = raw.trim();
    for (const match of line.matchAll(/\[([^\]\n]*)\]/g)) {
      if (!KNOWN_TAGS.includes(match[1].toLowerCase())) {
        unknownTags.push({ tag: match[0], line: index + 1, suggestion: suggestTag(match[1]) });
      }
    }
    const head = line.match(/^\[([^\]\n]*)\]/);
    if (head) {
      current = { tag: head[1], line: index + 1, text: line.slice(head[0].length).trim() };
      sections.push(current);
      const language = guessLanguage(current.text);
      if (language && language !== "en") textAfterTag.push({ tag: head[0], line: index + 1, language });
    } else if (line !== "") {
      if (!current) {
        current = { tag: null, line: index + 1, text: "" };
        sections.push(current);
      }
      current.text += (current.text ? "\n" : "") + line;
    }
  });
  return {
    lineCount: lines.length,
    sections: sections.map(({ tag, line, text: body }) => ({ tag, line, language: guessLanguage(body) })),
    unknownTags,
    textAfterTag,
  };
}

/** Status bar text, e.g. "12 lines · 3 sections · verse en, chorus zh (language guess)". */
export function summarize(analysis) {
  const { lineCount, sections } = analysis;
  const parts = [`${lineCount} line${lineCount === 1 ? "" : "s"}`, `${sections.length} section${sections.length === 1 ? "" : "s"}`];
  const languages = sections.map((s) => `${s.tag ?? "untagged"} ${s.language ?? "–"}`);
  if (languages.length) parts.push(`${languages.join(", ")} (language guess)`);
  return parts.join(" · ");
}

/** One warning per unknown tag and per line with non-English words after its leading tag. */
export function describeWarnings(analysis) {
  const unknown = analysis.unknownTags.map(({ tag, line, suggestion }) => {
    const fix = suggestion ? `use [${suggestion}]` : `known: ${KNOWN_TAGS.join(" ")}`;
    return `line ${line}: ${tag} is not a structure tag (read as unknown tokens), ${fix}`;
  });
  const inline = analysis.textAfterTag.map(
    ({ tag, line, language }) =>
      `line ${line}: words after ${tag} are read as English, not ${language}; start them on the next line`,
  );
  return [...unknown, ...inline];
}
