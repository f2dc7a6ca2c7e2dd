"""Per-line lyric language detection, reproducing the official pipeline's ``get_lang`` (design §5.3).

The official code runs a vendored LangSegment 0.3.5 (py3langid 0.3.0 model) with the 97-language filter
list, which turns on its "preview" mode. That segmenter is a small state machine with many quirks, and the
line language (hence the ``[lang]`` token and the cleaner) depends on all of them, so this module is a
behavioural re-implementation of exactly the paths that configuration can take:

1. Script runs are cut out of the line in a fixed order and replaced by placeholder keys ``⑥<tag><nnnnnn>⑥``:
   ``<xx>..</xx>`` tags, Hangul (ko), Thai (th), Cyrillic (ru), number runs, Latin (langid per sentence),
   quoted spans, bracketed spans.
2. The line is walked key by key; plain text between keys goes through the CJK parser (punctuation-split
   pieces classified by langid, with the zh/ja disambiguation rules), keys through their handlers.
3. Every kept piece adds its length to a per-language count (Chinese counted double) and is merged with the
   previous piece when the languages agree; ambiguous zh/ja pieces wait for the next piece to decide.
4. The line language is the largest count, or the second one when the largest is ``en``.

Where the official code would raise (and ``get_lang`` would answer ``en``), this code raises too and
:func:`detect_line_language` answers ``en``.
"""
from __future__ import annotations

import functools
import re

from . import zh_numbers

# The official filter list (language_filters.default): ISO 639-1 codes, in priority order. It is also the
# exact class list of the py3langid 0.3.0 model, so every langid answer passes the filter.
FILTERS = (
    "af", "am", "an", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de", "dz", "el",
    "en", "eo", "es", "et", "eu", "fa", "fi", "fo", "fr", "ga", "gl", "gu", "he", "hi", "hr", "ht", "hu", "hy",
    "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb", "lo", "lt", "lv", "mg",
    "mk", "ml", "mn", "mr", "ms", "mt", "nb", "ne", "nl", "nn", "no", "oc", "or", "pa", "pl", "ps", "pt", "qu",
    "ro", "ru", "rw", "se", "si", "sk", "sl", "sq", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "ug", "uk",
    "ur", "vi", "vo", "wa", "xh", "zh", "zu",
)
_FILTER_SET = frozenset(FILTERS)
_FILTER_STRING = "-".join(FILTERS)  # the official code tests several things by substring against this
_JA_BEFORE_ZH = _FILTER_STRING.find("ja") < _FILTER_STRING.find("zh")
_CJK_PRIORITY_THRESHOLD = 0.89

_KEY = re.compile(r"(⑥\$*\d+[\d]{6,}⑥)")
_NUMBER_KEY = re.compile(r"(⑥\d{6,}⑥)")
_PUNCT_RUN = re.compile(r"([^\w\s]+)")
_SENTENCE = re.compile(r"(.*?[。.?？!！]+[\n]{,1})")
_KANA = re.compile(r"[\u3040-\u309F\u30A0-\u30FF]+")

# Letters accepted in a "Latin" run in preview mode (lower-case French and Vietnamese letters only).
_FRENCH = "àáâãäåæçèéêëìíîïðñòóôõöùúûüýþÿ"
_VIETNAMESE = "đơưăáàảãạắằẳẵặấầẩẫậéèẻẽẹếềểễệíìỉĩịóòỏõọốồổỗộớờởỡợúùủũụứừửữựôâêơưỷỹ"


def _script_run(letters: str) -> re.Pattern:
    """Runs of `letters` with leading openers and trailing non-word characters."""
    return re.compile(r'(([【《（(“‘"\']*[' + letters + r"]+[\W\s]*)+)")


# (key tag, pattern, handler name), in the order the official code cuts them out.
_CUTTERS = (
    ("$1", re.compile(r"(<([a-zA-Z|-]*)>(.*?)<\/*[a-zA-Z|-]*>)"), "tag"),
    ("$6", _script_run("\uac00-\ud7a3"), "ko"),
    ("$8", _script_run("\u0e00-\u0e7f"), "th"),
    ("$7", _script_run("А-Яа-яЁё"), "ru"),
    ("00", re.compile(r"(\W*\d+\W+\d*\W*\d*)"), "number"),
    ("$5", _script_run("a-zA-Z" + _FRENCH + _VIETNAMESE), "latin"),
    ("$3", re.compile(r'(["\'])(.*?)(\1)'), "quote"),
    ("$4", re.compile(r"([\n]*[【《（(“‘])([^【《（(“‘’”)）》】]{3,})([’”)）》】][\W\s]*[\n]{,1})"), "quote"),
)


@functools.lru_cache(maxsize=1)
def _identifier():
    """The py3langid 0.3.0 identifier with normalised probabilities (loaded once, ~0.4 s)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as err:
        raise ImportError("lyric language detection needs py3langid 0.3.0: pip install py3langid==0.3.0") from err
    if not hasattr(LanguageIdentifier, "from_pickled_model"):
        raise ImportError(
            "lyric language detection needs the py3langid 0.3.0 model (the one the official ACE-Step uses); "
            "the installed py3langid has a different model. Install it with: pip install py3langid==0.3.0"
        )
    return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)


@functools.lru_cache(maxsize=8192)
def classify(text: str) -> tuple[str, float]:
    """py3langid language and its probability rounded to 3 decimals, as the segmenter uses them."""
    lang, prob = _identifier().classify(text)
    return lang, round(float(prob), 3)


def _clean_for_langid(text: str) -> str:
    """Non-word runs -> one space, repeated characters squeezed, stripped."""
    text = re.sub(r"(.*?)([^\w]+)", r"\1 ", text)
    return re.sub(r"(.)\1+", r"\1", text).strip()


def _without_punctuation(text: str) -> str:
    return _PUNCT_RUN.sub("", re.sub(r"\n+", "", text)).strip()


def _is_numeric(text: str) -> tuple[str, bool]:
    """(text without punctuation, whether it is empty or only digits); a lone newline is neither."""
    if text == "\n":
        return text, False
    clear = _without_punctuation(text)
    return clear, not re.sub(r"\d+", "", clear)


def _has_han(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _spaced_capitals(text: str) -> str:
    """Latin pieces: a space before every inner capital, '-' stripped at the ends, a trailing space."""
    return re.sub(r"(?<!\b)([A-Z])", r" \1", text).strip("-") + " "


def _ssml(name: str, text: str) -> tuple[str, str]:
    """<telephone>/<number>/<currency>/<date> tags are read out in Chinese; other tag names are kept."""
    readers = {
        "telephone": zh_numbers.ssml_telephone,
        "number": zh_numbers.ssml_number,
        "currency": zh_numbers.ssml_currency,
        "date": zh_numbers.ssml_date,
    }
    if name in readers:
        return "zh", readers[name](text)
    return name, text


class _Segmenter:
    """State of one ``getTexts`` call: pieces, per-language counts, waiting ambiguous pieces."""

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None
        self.waiting: list[dict] = []
        self.keys: dict[str, tuple[str, str | tuple[str, ...]]] = {}
        self.at_end = False

    # -- counting and merging --------------------------------------------------------------------
    def _count(self, lang: str, text: str) -> None:
        if self.counts is None:
            self.counts = {}
        if "|" not in lang:
            self.counts[lang] = self.counts.get(lang, 0) + (len(text) * 2 if lang == "zh" else len(text))

    def _save(self, words: list[dict], lang: str, text: str, score: float, symbol: object) -> dict:
        """Append a piece (or extend the previous one of the same language) and count it."""
        clear, numeric = _is_numeric(text)
        prev = words[-1] if words else None
        if symbol is None and prev is not None and prev["symbol"] is None:
            if not clear or numeric:
                lang = prev["lang"]
            if prev["lang"] == lang:
                self._count(prev["lang"], text)
                prev["text"] += text
                return prev
            if _is_numeric(prev["text"])[1]:
                text = prev["text"] + text
                words.pop()
        piece = {"lang": lang, "text": text, "score": score, "symbol": symbol}
        if "?" in lang or lang in _FILTER_SET or lang in FILTERS[0]:
            words.append(piece)
            self._count(lang, text)
        return piece

    def _add(self, words: list[dict], lang: str | None, text: str, score: float, symbol: object = None) -> None:
        """Settle a waiting ambiguous piece against this one, then save this one or let it wait."""
        if text != "\n" and (text is None or not text.strip()):
            return
        lang = (lang or "").lower()
        if lang == "en":
            text = _spaced_capitals(text)
        had_waiting = bool(self.waiting)
        prev = self.waiting.pop() if had_waiting else None
        if prev is None:
            prev = words[-1] if words else None
        if prev and "|" in prev["lang"]:
            if lang in prev["lang"]:
                prev["lang"] = lang = lang.split("|")[0]
            else:
                prev["lang"] = prev["lang"].split("|")[0]
            if had_waiting:
                prev = self._save(words, prev["lang"], prev["text"], prev["score"], prev["symbol"])
        prev_lang = prev["lang"] if prev else None
        if "|" in lang and prev_lang and prev_lang not in lang and "…" not in lang:
            lang = lang.split("|")[0]
        if "|" in lang:
            self.waiting.append({"lang": lang, "text": text, "score": score, "symbol": symbol})
        else:
            self._save(words, lang, text, score, symbol)

    # -- plain (CJK or leftover) text --------------------------------------------------------------
    def _parse_plain(self, words: list[dict], segment: str) -> None:
        """Text between keys: punctuation-split pieces, short ones glued forward, each classified by langid."""
        pieces = _PUNCT_RUN.split(segment)
        last = len(pieces) - 1
        for index in range(len(pieces)):
            text = pieces[index]
            if not text:
                continue
            at_end = index >= last
            following = pieces[index + 1] if not at_end else ""
            if not at_end and (not _without_punctuation(text) or not _without_punctuation(following)):
                pieces[index + 1] = text + following
                continue
            cleaned = _clean_for_langid(re.sub(r"\d+", "", _NUMBER_KEY.sub("", text)))
            if not at_end and len(cleaned) <= 2:
                pieces[index + 1] = text + following
                continue
            lang, score = classify(cleaned)
            prev_lang = words[-1]["lang"] if words else None
            if lang != "zh" and all("\u4e00" <= c <= "\u9fff" for c in re.sub(r"\s", "", cleaned)):
                lang, score = "zh", 1
            if len(cleaned) <= 5 and _has_han(cleaned):
                lang = self._resolve_short_han(words, text, cleaned, lang, score, prev_lang, at_end)
            text = _NUMBER_KEY.sub(self._restore_number, text)
            self._add(words, lang, text, score)

    def _resolve_short_han(
        self, words: list[dict], text: str, cleaned: str, lang: str, score: float, prev_lang: str | None, at_end: bool
    ) -> str:
        """zh/ja decision for a short piece with Han characters (may leave it ambiguous: 'zh|ja|…')."""
        if score < _CJK_PRIORITY_THRESHOLD:
            lang = "ja" if _JA_BEFORE_ZH else "zh"
        if _KANA.search(cleaned):
            return "ja"
        if len(cleaned) > 2 and score > 0.90:
            return lang
        if at_end and self.at_end:
            return "zh" if len(cleaned) <= 1 else lang
        unknown = "zh|ja" if lang == "zh" or (len(cleaned) <= 2 and prev_lang == "zh") else "ja|zh"
        last_char = re.sub(r"\s+", "", text)[-1]
        related = (prev_lang in unknown or unknown in prev_lang) if prev_lang else False
        if last_char in "。.":
            return prev_lang if related and words else lang
        return f"{unknown}|…"

    def _restore_number(self, match: re.Match) -> str:
        key = match.group(0)
        if key in self.keys:
            return self.keys[key][1]
        return key

    # -- keyed spans ---------------------------------------------------------------------------------
    def _handle(self, words: list[dict], handler: str, found: str | tuple[str, ...]) -> None:
        """One cut-out span, by the kind of cutter that found it."""
        if handler == "tag":
            _, name, inner = found
            if name in _FILTER_STRING:
                self._add(words, name, inner, 1.0, True)
            else:
                lang, inner = _ssml(name, inner)
                self._add(words, lang, inner, 1.0, name)
        elif handler in ("ko", "th", "ru"):
            self._add(words, handler, found[0], 1.0)
        elif handler == "number":
            self._add(words, words[0]["lang"] if words else "zh", found, 0.0)
        elif handler == "latin":
            for sentence in _SENTENCE.split(found[0]):
                if sentence.strip():
                    lang, score = classify(_clean_for_langid(sentence))
                    self._add(words, lang, sentence, score)
        else:
            self._handle_quote(words, found)

    def _handle_quote(self, words: list[dict], found: tuple[str, str, str]) -> None:
        text = "".join(found)
        if _KEY.findall(text):
            self._walk(words, text, top_level=False)
            return
        if len(_clean_for_langid(found[1])) <= 5:
            self._parse_plain(words, text)
        else:
            lang, score = classify(_clean_for_langid(found[1]))
            self._add(words, lang, text, score)

    def _walk(self, words: list[dict], text: str, top_level: bool) -> None:
        """Handle keys and the plain text between them, left to right."""
        segments = _KEY.split(text)
        for index, segment in enumerate(segments):
            if top_level:
                self.at_end = index >= len(segments) - 1
            if _KEY.match(segment):
                handler, found = self.keys[segment]
                self._handle(words, handler, found)
            else:
                self._parse_plain(words, segment)

    def _cut(self, text: str) -> str:
        """Replace the spans each cutter finds by keys (a line that is one single span is left as it is)."""
        for tag, pattern, handler in _CUTTERS:
            found = pattern.findall(text)
            if len(found) == 1 and "".join(found[0]) == text:
                continue
            for i, match in enumerate(found):
                key = f"⑥{tag}{i:06d}⑥"
                text = pattern.sub(key, text, count=1)
                self.keys[key] = (handler, match)
        return text

    def run(self, text: str) -> None:
        """Segment and count one text (the official ``getTexts`` + ``getCounts`` state)."""
        for line in re.findall(r".*\n*", _KEY.sub("", text)):
            if line.strip():
                self.at_end = False
                self.keys = {}
                self._walk([], self._cut(line), top_level=True)

    def language(self) -> str:
        """Largest count; the second one when the largest is en; zh when nothing was counted."""
        if self.counts is None:
            return "zh"
        ranked = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        if not ranked:
            raise ValueError("no language counted")
        if len(ranked) > 1 and ranked[0][0] == "en":
            return ranked[1][0]
        return ranked[0][0]


def detect_line_language(line: str) -> str:
    """Official ``get_lang(line)``: the raw LangSegment answer (any code), ``en`` if it fails (design §5.3)."""
    if not line.strip():
        return "zh"
    segmenter = _Segmenter()
    try:
        segmenter.run(line)
        return segmenter.language()
    except ImportError:
        raise
    except Exception:  # official get_lang answers en whenever the segmenter raises
        return "en"

