"""Per-language lyric normalisation before BPE (design §5.4): XTTS-v2-style multilingual cleaners.

Every stage keeps the official behaviour exactly, including what looks odd (the Spanish '$' reading, the
unescaped '.' in the thousands-dot pattern, stages whose errors are swallowed), because the token ids
depend on it. Heavy helpers (pypinyin, hangul-romanize, cutlet) are imported on first use only.
"""
from __future__ import annotations

import functools
import re

from .zh_numbers import normalize_chinese_text

MULTILINGUAL = frozenset({"ar", "cs", "de", "en", "es", "fr", "hu", "it", "nl", "pl", "pt", "ru", "tr", "zh", "ko"})

_ABBREVIATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
        ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
        ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
        ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort"),
    ),
    "es": (
        ("sra", "señora"), ("sr", "señor"), ("dr", "doctor"), ("dra", "doctora"), ("st", "santo"),
        ("co", "compañía"), ("jr", "junior"), ("ltd", "limitada"),
    ),
    "fr": (
        ("mme", "madame"), ("mr", "monsieur"), ("dr", "docteur"), ("st", "saint"), ("co", "compagnie"),
        ("jr", "junior"), ("ltd", "limitée"),
    ),
    "de": (("fr", "frau"), ("dr", "doktor"), ("st", "sankt"), ("co", "firma"), ("jr", "junior")),
    "pt": (
        ("sra", "senhora"), ("sr", "senhor"), ("dr", "doutor"), ("dra", "doutora"), ("st", "santo"),
        ("co", "companhia"), ("jr", "júnior"), ("ltd", "limitada"),
    ),
    "it": (
        ("sig", "signore"), ("dr", "dottore"), ("st", "santo"), ("co", "compagnia"), ("jr", "junior"),
        ("ltd", "limitata"),
    ),
    "pl": (("p", "pani"), ("m", "pan"), ("dr", "doktor"), ("sw", "święty"), ("jr", "junior")),
    "cs": (("dr", "doktor"), ("ing", "inženýr"), ("p", "pan")),
    "ru": (("г-жа", "госпожа"), ("г-н", "господин"), ("д-р", "доктор")),
    "nl": (("dhr", "de heer"), ("mevr", "mevrouw"), ("dr", "dokter"), ("jhr", "jonkheer")),
    "tr": (("b", "bay"), ("byk", "büyük"), ("dr", "doktor")),
    "hu": (("dr", "doktor"), ("b", "bácsi"), ("nőv", "nővér")),
}
# Russian abbreviations end at a word boundary, the others at a literal dot.
_ABBREVIATION_RES = {
    lang: tuple(
        (re.compile(r"\b" + short + (r"\b" if lang == "ru" else r"\."), re.IGNORECASE), long) for short, long in table
    )
    for lang, table in _ABBREVIATIONS.items()
}

# (&, @, %, #, $, £, °) spoken per language.
_SYMBOL_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("and", "at", "percent", "hash", "dollar", "pound", "degree"),
    "es": ("y", "arroba", "por ciento", "numeral", "dolar", "libra", "grados"),
    "fr": ("et", "arobase", "pour cent", "dièse", "dollar", "livre", "degrés"),
    "de": ("und", "at", "prozent", "raute", "dollar", "pfund", "grad"),
    "pt": ("e", "arroba", "por cento", "cardinal", "dólar", "libra", "graus"),
    "it": ("e", "chiocciola", "per cento", "cancelletto", "dollaro", "sterlina", "gradi"),
    "pl": ("i", "małpa", "procent", "krzyżyk", "dolar", "funt", "stopnie"),
    "ar": ("و", "على", "في المئة", "رقم", "دولار", "جنيه", "درجة"),
    "zh": ("和", "在", "百分之", "号", "美元", "英镑", "度"),
    "cs": ("a", "na", "procento", "křížek", "dolar", "libra", "stupně"),
    "ru": ("и", "собака", "процентов", "номер", "доллар", "фунт", "градус"),
    "nl": ("en", "bij", "procent", "hekje", "dollar", "pond", "graden"),
    "tr": ("ve", "at", "yüzde", "diyez", "dolar", "sterlin", "derece"),
    "hu": ("és", "kukac", "százalék", "kettőskereszt", "dollár", "font", "fok"),
    "ko": ("그리고", "에", "퍼센트", "번호", "달러", "파운드", "도"),
}
_SYMBOLS = ("&", "@", "%", "#", "$", "£", "°")

# The official patterns, each behind "(?<![0-9])": a match can only start where a digit run starts (a start inside
# a run fails whenever the run's own start fails, and every match ends where its run ends), so the results are the
# official ones, in time linear in the length of a digit run instead of quadratic.
_RUN_START = r"(?<![0-9])"
_ORDINAL_RES = {
    "en": re.compile(r"([0-9]+)(st|nd|rd|th)"),
    "es": re.compile(r"([0-9]+)(º|ª|er|o|a|os|as)"),
    "fr": re.compile(r"([0-9]+)(º|ª|er|re|e|ème)"),
    "de": re.compile(r"([0-9]+)(st|nd|rd|th|º|ª|\.(?=\s|$))"),
    "pt": re.compile(r"([0-9]+)(º|ª|o|a|os|as)"),
    "it": re.compile(r"([0-9]+)(º|°|ª|o|a|i|e)"),
    "pl": re.compile(r"([0-9]+)(º|ª|st|nd|rd|th)"),
    "ar": re.compile(r"([0-9]+)(ون|ين|ث|ر|ى)"),
    "cs": re.compile(r"([0-9]+)\.(?=\s|$)"),
    "ru": re.compile(r"([0-9]+)(-й|-я|-е|-ое|-ье|-го)"),
    "nl": re.compile(r"([0-9]+)(de|ste|e)"),
    "tr": re.compile(r"([0-9]+)(\.|inci|nci|uncu|üncü|\.)"),
    "hu": re.compile(r"([0-9]+)(\.|adik|edik|odik|edik|ödik|ödike|ik)"),
    "ko": re.compile(r"([0-9]+)(번째|번|차|째)"),
}
_ORDINAL_RES = {lang: re.compile(_RUN_START + pattern.pattern) for lang, pattern in _ORDINAL_RES.items()}
# Word that joins whole units and cents in num2words' currency reading; cut off for whole amounts.
_CURRENCY_AND = {
    "en": ", ", "es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e ", "pl": ", ", "cs": ", ",
    "ru": ", ", "nl": ", ", "ar": ", ", "tr": ", ", "hu": ", ", "ko": ", ",
}
_CURRENCY_RES = (
    ("GBP", re.compile(r"((£[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+£))")),
    ("USD", re.compile(r"((\$[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+\$))")),
    ("EUR", re.compile(r"(([0-9\.\,]*[0-9]+€)|((€[0-9\.\,]*[0-9]+)))")),
)
_COMMA_THOUSANDS_RE = re.compile(r"\b\d{1,3}(,\d{3})*(\.\d+)?\b")
_DOT_THOUSANDS_RE = re.compile(r"\b\d{1,3}(.\d{3})*(\,\d+)?\b")  # the unescaped '.' is official
_DECIMAL_RE = re.compile(_RUN_START + r"([0-9]+[.,][0-9]+)")
_INTEGER_RE = re.compile(r"[0-9]+")
_WHITESPACE_RE = re.compile(r"\s+")


def _num2words(value, lang: str, **kwargs) -> str:
    from num2words import num2words

    return num2words(value, lang="cz" if lang == "cs" else lang, **kwargs)


def _currency_words(match: re.Match, lang: str, currency: str) -> str:
    amount = float(re.sub(r"[^\d.]", "", match.group(0).replace(",", ".")))
    words = _num2words(amount, lang, to="currency", currency=currency)
    if amount.is_integer():
        cut = words.rfind(_CURRENCY_AND[lang])
        if cut != -1:
            words = words[:cut]
    return words


def expand_numbers(text: str, lang: str) -> str:
    """Thousands separators, currencies, decimals, ordinals, integers -> words (zh: Chinese reading)."""
    if lang == "zh":
        return normalize_chinese_text(text)
    if lang in ("en", "ru"):
        text = _COMMA_THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), text)
    else:
        text = _DOT_THOUSANDS_RE.sub(lambda m: m.group(0).replace(".", ""), text)
    try:
        for currency, pattern in _CURRENCY_RES:
            text = pattern.sub(lambda m: _currency_words(m, lang, currency), text)
    except Exception:  # official: a failing currency stops the currency stage only
        pass
    if lang != "tr":
        text = _DECIMAL_RE.sub(lambda m: _num2words(float(m.group(1).replace(",", ".")), lang), text)
    text = _ORDINAL_RES[lang].sub(lambda m: _num2words(int(m.group(1)), lang, ordinal=True), text)
    return _INTEGER_RE.sub(lambda m: _num2words(int(m.group(0)), lang), text)


def expand_abbreviations(text: str, lang: str) -> str:
    """Per-language abbreviation table (e.g. en 'mr.' -> 'mister')."""
    for pattern, replacement in _ABBREVIATION_RES.get(lang, ()):
        text = pattern.sub(replacement, text)
    return text


def expand_symbols(text: str, lang: str) -> str:
    """&, @, %, #, $, £, ° -> spoken words of the language, double spaces folded, stripped."""
    for symbol, word in zip(_SYMBOLS, _SYMBOL_WORDS[lang]):
        text = text.replace(symbol, f" {word} ").replace("  ", " ")
    return text.strip()


def multilingual_cleaners(text: str, lang: str) -> str:
    """Quotes out, lowercase, numbers, abbreviations, symbols, whitespace (design §5.4)."""
    text = text.replace('"', "")
    if lang == "tr":
        text = text.replace("İ", "i").replace("Ö", "ö").replace("Ü", "ü")
    text = text.lower()
    for stage in (expand_numbers, expand_abbreviations, expand_symbols):
        try:
            text = stage(text, lang)
        except Exception:  # official: each stage's errors are swallowed and the stage is skipped
            pass
    return _WHITESPACE_RE.sub(" ", text)


@functools.lru_cache(maxsize=1)
def _pinyin():
    import pypinyin

    return functools.partial(
        pypinyin.pinyin, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True
    )


@functools.lru_cache(maxsize=1)
def _hangul():
    from hangul_romanize import Transliter
    from hangul_romanize.rule import academic

    return Transliter(academic)


@functools.lru_cache(maxsize=1)
def _cutlet():
    try:
        import cutlet
    except ImportError as err:
        raise ImportError(
            "Japanese lyrics need the optional packages cutlet, fugashi and unidic-lite "
            "(romaji transliteration, as the official ACE-Step). Install them with: "
            "pip install cutlet fugashi unidic-lite"
        ) from err
    return cutlet.Cutlet()


def chinese_to_pinyin(text: str) -> str:
    """pypinyin TONE3 with neutral tone 5, first reading, syllables joined without separators."""
    return "".join(item[0] for item in _pinyin()(text))


def korean_to_latin(text: str) -> str:
    """Hangul -> Latin with hangul-romanize's academic rule."""
    return _hangul().translit(text)


def japanese_to_romaji(text: str) -> str:
    """cutlet romaji, lowercased (needs cutlet + fugashi + unidic-lite)."""
    return _cutlet().romaji(text).lower()


def clean_line(text: str, lang: str) -> str:
    """One lyric line in one of the 17 supported languages -> the text the BPE sees (before '[lang]')."""
    if lang in MULTILINGUAL:
        text = multilingual_cleaners(text, lang)
        if lang == "zh":
            text = chinese_to_pinyin(text)
        elif lang == "ko":
            text = korean_to_latin(text)
        return text
    if lang == "ja":
        return japanese_to_romaji(text)
    if lang == "hi":
        return _WHITESPACE_RE.sub(" ", text.lower())
    raise ValueError(f"lyric language {lang!r} is not one of the supported codes {sorted(MULTILINGUAL | {'ja', 'hi'})}")
