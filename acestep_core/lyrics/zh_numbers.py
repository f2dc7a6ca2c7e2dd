"""Chinese number reading and the Chinese text normaliser of the official lyric cleaners (design §5.4).

The official zh path runs a ``TextNorm`` with every option off: dates, money, phone numbers, fractions,
percentages, counted quantities, long digit strings and plain numbers are read out in Chinese characters,
then every CJK or ASCII punctuation mark becomes ``,``. This module reproduces that behaviour, including
its quirks (each found number replaces the *first* equal substring of the text, not necessarily the one
that was matched), because the token ids depend on them.
"""
from __future__ import annotations

import re
import string

_DIGITS = "零一二三四五六七八九"
_LIANG = "两"
_POINT = "点"
# Digit groupings of the official reader (power of ten -> character), "mid" numbering: 亿 = 10^8, 兆 = 10^12 ...
_UNITS_TEXTNORM = ((1, "十"), (2, "百"), (3, "千"), (4, "万")) + tuple(
    ((i + 2) * 4, c) for i, c in enumerate("亿兆京垓秭穰沟涧正载")
)
# The language segmenter's own reader (used only for its <currency>/<date> tags) stops at 亿.
_UNITS_SEGMENTER = ((1, "十"), (2, "百"), (3, "千"), (4, "万"), (8, "亿"))


def _spell_groups(value: str, units: tuple[tuple[int, str], ...]) -> list[tuple[str, str | int]]:
    """Digits -> symbols ("d", digit char) / ("u", power), largest unit first, a zero kept before an inner gap."""
    stripped = value.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        return [("d", "0"), ("d", stripped)] if len(stripped) != len(value) else [("d", stripped)]
    power = next(p for p, _ in reversed(units) if p < len(stripped))
    return _spell_groups(value[:-power], units) + [("u", power)] + _spell_groups(stripped[-power:], units)


def read_number(number: str, *, use_units: bool = True, liang: bool = True) -> str:
    """A decimal digit string (optionally with one '.') read in Chinese, e.g. '2024' -> 两千零二十四."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"number {number!r} has more than one decimal point")
    whole, frac = parts if len(parts) == 2 else (parts[0], "")
    if use_units and len(whole) > 1:
        symbols = _spell_groups(whole, _UNITS_TEXTNORM)
    else:
        symbols = [("d", c) for c in whole]
    if frac:
        symbols += [("p", 0)] + [("d", c) for c in frac]
    unit_chars = dict(_UNITS_TEXTNORM)
    out = []
    for i, (kind, value) in enumerate(symbols):
        if kind == "u":
            out.append(unit_chars[value])
        elif kind == "p":
            out.append(_POINT)
        else:
            value = int(value)
            prev = symbols[i - 1] if i > 0 else None
            nxt = symbols[i + 1] if i + 1 < len(symbols) else None
            two_as_liang = (
                liang
                and value == 2
                and nxt is not None
                and nxt[0] == "u"
                and nxt[1] != 1
                and (prev is None or (prev[0] == "u" and prev[1] != 1))
            )
            out.append(_LIANG if two_as_liang else _DIGITS[value])
    text = "".join(out)
    if text.startswith(_POINT):
        return _DIGITS[0] + text
    if len(text) >= 2 and text[0] == "一" and text[1] == "十":
        text = text[1:]
    return text


def _read_digits(number: str) -> str:
    """Digit by digit (years, long numbers, phone numbers)."""
    return read_number(number, use_units=False, liang=False)


# ----------------------------------------------------------------------------------------------------
# The segmenter's SSML-style tags (<number>, <telephone>, <currency>, <date>).

_ASCII_DIGITS = {str(i): c for i, c in enumerate(_DIGITS)}


def _segmenter_cardinal(value: str) -> str:
    """Cardinal reading without 两 and without the zero-padding of the text normaliser."""
    if not value:
        return ""
    value = value.lstrip("0")
    if not value:
        return _DIGITS[0]
    symbols = _spell_groups(value, _UNITS_SEGMENTER)
    unit_chars = dict(_UNITS_SEGMENTER)
    words = [unit_chars[v] if k == "u" else _ASCII_DIGITS[v] for k, v in symbols]
    if len(words) >= 2 and words[0] == "一" and words[1] == "十":
        words = words[1:]
    return "".join(words)


def _segmenter_num2str(value: str) -> str:
    parts = value.split(".")
    if len(parts) > 2:
        raise ValueError(f"number {value!r} has more than one decimal point")
    whole, frac = parts if len(parts) == 2 else (parts[0], "")
    text = _segmenter_cardinal(whole)
    frac = frac.rstrip("0")
    if frac:
        text = (text or _DIGITS[0]) + _POINT + "".join(_ASCII_DIGITS[d] for d in frac)
    return text


def _map_digit_runs(text: str, read) -> str:
    return "".join(read(part) if re.match(r"\d+", part) else part for part in re.split(r"(\d+)", text))


def ssml_number(text: str) -> str:
    """<number>: every digit read on its own ('.' -> 点); non-ASCII digits vanish."""
    return _map_digit_runs(text, lambda run: "".join(_ASCII_DIGITS.get(d, "") for d in run)).replace(".", _POINT)


def ssml_telephone(text: str) -> str:
    """<telephone>: digit by digit, +86 dropped, 一 read as 幺."""
    return ssml_number(text.replace("+86", "")).replace("一", "幺")


def ssml_currency(text: str) -> str:
    """<currency>: digit runs read as amounts."""
    return _map_digit_runs(text, _segmenter_num2str).replace(".", _POINT)


def ssml_date(text: str) -> str:
    """<date>: '2024/8/24 10:30' style dates and times read as 年月日 / 点分秒."""
    if text is None or text.strip() == "":
        return ""
    text = re.sub(r"日", "", re.sub(r"[\/\._|年|月]", "-", text))
    fields = text.split(" ")
    if len(fields) == 1 and ":" in fields[0]:
        time_text, fields = fields[0], []
    else:
        time_text = fields[1] if len(fields) >= 2 else ""

    def nonzero(value: str, suffix: str, read) -> str:
        value = read(value)
        return f"{value}{suffix}" if value not in (None, "", "0") else ""

    ymd = ""
    if fields:
        year = month = day = ""
        parts = fields[0].split("-")
        if len(parts) == 3:
            year, month, day = parts
        elif len(parts) == 2:
            if len(parts[0]) == 4:
                year, month = parts
            else:
                month, day = parts
        elif len(parts[0]) > 0:
            if len(parts[0]) == 4:
                year = parts[0]
            else:
                day = parts[0]
        joined = nonzero(year, "年", ssml_number) + nonzero(month, "月", ssml_currency) + nonzero(day, "日", ssml_currency)
        ymd = re.sub(r"([年|月|日])+", r"\1", joined)
    times = re.sub(r"[\/\.\-：_]", ":", time_text).split(":")
    hours = minutes = seconds = ""
    if len(times) == 3:
        hours, minutes, seconds = times
    elif len(times) == 2:
        hours, minutes = times
    elif len(times[0]) > 0:
        hours = f"{times[0]}点"
    if len(times) > 1:
        hours = nonzero(hours, "点", ssml_currency)
        minutes = nonzero(minutes, "分", ssml_currency)
        seconds = nonzero(seconds, "秒", ssml_currency)
    return ymd + re.sub(r"([点|分|秒])+", r"\1", hours + minutes + seconds)


# ----------------------------------------------------------------------------------------------------
# Text normaliser (official zh_num2words.TextNorm with default options).

_CURRENCY_UNITS = "((亿|千万|百万|万|千|百)|(亿|千万|百万|万|千|百|)元|(亿|千万|百万|万|千|百|)块|角|毛|分)"
_QUANTIFIERS = (
    "(匹|张|座|回|场|尾|条|个|首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|"
    "砣|座|客|贯|扎|捆|刀|令|打|手|罗|坡|山|岭|江|溪|钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|"
    "针|线|管|名|位|身|堂|课|本|页|家|户|层|丝|毫|厘|分|钱|两|斤|担|铢|石|钧|锱|忽|(千|毫|微)克|"
    "毫|厘|分|寸|尺|丈|里|寻|常|铺|程|(千|分|厘|毫|微)米|撮|勺|合|升|斗|石|盘|碗|碟|叠|桶|笼|盆|"
    "盒|杯|钟|斛|锅|簋|篮|盘|桶|罐|瓶|壶|卮|盏|箩|箱|煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|分|旬|"
    "纪|岁|世|更|夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|颗|幢|堆|条|根|支|道|面|片|张|颗|块)"
)
_DATE_RE = re.compile(r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)")
_MONEY_RE = re.compile(r"\D+((\d+(\.\d+)?)[多余几]?" + _CURRENCY_UNITS + r"(\d" + _CURRENCY_UNITS + r"?)?)")
_MOBILE_RE = re.compile(r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
_LANDLINE_RE = re.compile(r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
_FRACTION_RE = re.compile(r"(\d+/\d+)")
_PERCENT_RE = re.compile(r"(\d+(\.\d+)?%)")
_QUANTITY_RE = re.compile(r"(\d+(\.\d+)?)[多余几]?" + _QUANTIFIERS)
_LONG_DIGITS_RE = re.compile(r"(\d{4,32})")
_NUMBER_RE = re.compile(r"(\d+(\.\d+)?)")
_LETTER_TWO_RE = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏·〈〉-"
)
_PUNCTUATION_TO_COMMA = str.maketrans({c: "," for c in _CN_PUNCTUATION + string.punctuation})


def _read_date(date: str) -> str:
    try:
        year, rest = date.strip().split("年", 1)
        year = _read_digits(year) + "年"
    except ValueError:
        rest, year = date, ""
    month = day = ""
    if rest:
        try:
            month, day = rest.strip().split("月", 1)
            month = read_number(month) + "月"
        except ValueError:
            month, day = "", date
        if day:
            day = read_number(day[:-1]) + day[-1]
    return year + month + day


def _read_money(money: str) -> str:
    for number, _ in _NUMBER_RE.findall(money):
        money = money.replace(number, read_number(number))
    return money


def _read_phone(phone: str, landline: bool) -> str:
    parts = phone.split("-") if landline else phone.strip("+").split()
    return "".join(_read_digits(p) for p in parts)


def _read_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return read_number(denominator) + "分之" + read_number(numerator)


def _replace_first(text: str, pattern: re.Pattern, read) -> str:
    """For every match (outer group), replace its first occurrence in the running text by ``read(match)``."""
    for found in pattern.findall(text):
        found = found[0] if isinstance(found, tuple) else found
        text = text.replace(found, read(found), 1)
    return text


def normalize_chinese_text(text: str) -> str:
    """Numbers, dates, money, phones, fractions, percentages -> Chinese; all punctuation -> ',' (design §5.4)."""
    text = "^" + text + "$"
    text = _replace_first(text, _DATE_RE, _read_date)
    text = _replace_first(text, _MONEY_RE, _read_money)
    text = _replace_first(text, _MOBILE_RE, lambda s: _read_phone(s, landline=False))
    text = _replace_first(text, _LANDLINE_RE, lambda s: _read_phone(s, landline=True))
    text = _replace_first(text, _FRACTION_RE, _read_fraction)
    text = text.replace("％", "%")
    text = _replace_first(text, _PERCENT_RE, lambda s: "百分之" + read_number(s.strip().strip("%")))
    text = _replace_first(text, _QUANTITY_RE, read_number)
    text = _replace_first(text, _LONG_DIGITS_RE, _read_digits)
    text = _replace_first(text, _NUMBER_RE, read_number)
    for whole, left, right in _LETTER_TWO_RE.findall(text):
        text = text.replace(whole, left + "2" + right, 1)
    text = text.lstrip("^").rstrip("$")
    return text.translate(_PUNCTUATION_TO_COMMA)
