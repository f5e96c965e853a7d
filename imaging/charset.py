"""Character sets on ingest: decode every text value ourselves, detect mislabelled values, and
leave the dataset as ISO_IR 192 (UTF-8), so every later step sees correct Unicode ``str`` values.

What the standard says and how this module follows it
----------------------------------------------------
- PS3.3 C.12.1.1.2 and PS3.5 6.1.2: (0008,0005) Specific Character Set names the repertoire of the
  charset-affected VRs SH, LO, ST, LT, UC, UT and PN (PS3.5 6.1.2.3, 6.2). Other VRs (CS, DA, UI,
  ...) are always the default repertoire and are never touched here, nor are bulk values (Pixel
  Data, OB/OW/UN): they stay :class:`~pydicom.dataelem.RawDataElement` and are never converted.
- PS3.5 6.1.2.5 and PS3.3 Tables C.12-2 to C.12-5: a single value without code extensions
  (``ISO_IR 100``, ``ISO_IR 144``...) is one fixed G0/G1 pair; ``ISO_IR 192``, ``GB18030`` and
  ``GBK`` are stand-alone and allow no code extensions (value 1 wins, later values are ignored);
  several ``ISO 2022 IR ...`` values allow switching graphic sets with the escape sequences of
  Tables C.12-3/C.12-4, value 1 (empty = ``ISO 2022 IR 6``) being the initial designation.
  The decoder here is a small ISO 2022 state machine tracking G0 and G1: only escapes of declared
  sets are accepted, multi-byte G0 sets (JIS X 0208/0212) consume GL bytes in pairs, and at the
  points where PS3.5 6.1.2.5.3 requires the value-1 set to be active again (CR, LF, TAB, FF, the
  ``\\`` value delimiter and, in PN, ``^`` and ``=``) the state goes back to the initial one. A
  value that only decodes when designations survive a delimiter (an encoder that forgot to
  re-designate) is accepted on a second pass with the declared sets. PN component groups
  (alphabetic=ideographic=phonetic, PS3.5 6.2.1) are decoded in one pass with those rules, so
  each group may use its own escapes.
- PS3.3 C.12.1.1.2 / PS3.5 7.5.3: a sequence item without (0008,0005) inherits its parent's
  character set; an item with its own value overrides it for that item and everything below.

Decoding is strict: an undefined byte, an undeclared escape, a C1 control (0x80-0x9F, never a
graphic character in ISO 8859) or a control character other than TAB, LF, FF and CR makes the
value invalid for that character set. pydicom's own decoder would warn and put U+FFFD in its place;
we never keep such garbage.

Mislabelled values (partners in China and Central Asia) are common; the heuristics, in order:

1. A value that is valid for its declaration is kept, except under a declaration of none,
   ``ISO_IR 6``/``ISO 2022 IR 6`` (which no non-ASCII byte is valid for) or ``ISO_IR 100``,
   where any byte string "decodes" as Latin-1, so the guesses below are tried first.
2. Strict UTF-8 (valid UTF-8 of non-ASCII text is almost never an accident).
3. CP1251 Cyrillic or GB18030 Chinese:

   - CP1251 when every non-ASCII byte is a CP1251 letter (Russian, Ukrainian, Belarusian) or
     common punctuation; in every word containing them, Cyrillic letters outnumber ASCII
     letters and are all capitals, all lower case or capitalised; one word has two or more.
     ``Иванов^Иван`` read as Latin-1 (``Èâàíîâ^Èâàí``) passes; ``Müller^Jürgen`` does not.
   - GB18030 (declaration none, Latin-1 or a failed stand-alone one) when every non-ASCII byte
     pair is a level-1 hanzi of GB2312 (lead 0xB0-0xD7, trail 0xA1-0xFE) and no ideograph
     touches a Latin letter (``CONCEIÇÃO``: ÇÃ is such a pair).
   - Both can pass only for a name in Cyrillic capitals (0xC0-0xDF pair as hanzi; lower-case
     letters, 0xE0-0xFF, never lead one): capitals go to CP1251, anything else to GB18030.
4. The declared Latin-1 reading, if it was valid (``Müller^Jürgen`` stays Latin-1).
5. GB18030 beyond level 1 (same declarations): every non-ASCII character CJK (ideographs, CJK
   punctuation, full-width forms, the middle dot of transliterated names), none touching a Latin
   letter, at least half the ideographs in GB2312 (陶喆 passes, random bytes do not).
6. Windows-1252 for ``ISO_IR 100`` values with C1 bytes (``’``, ``–``, ``€``); for a declaration
   of none, Latin-1/Windows-1252 when accented letters are a minority in each word (``Müller``).

Anything else is emptied (value ``None``) and reported. Limits: short values are ambiguous
(``\\xd0\\xa1`` is 小 in GB18030 and С in UTF-8: UTF-8 wins; an undeclared Chinese name whose
bytes all fall in 0xC0-0xDF, about one character in five, reads as Cyrillic capitals); CP1251 text
declared as another single-byte Cyrillic set (ISO_IR 144) decodes validly and is not second-guessed;
Latin-1 bytes declared UTF-8 are emptied, not guessed; Kazakh and Kyrgyz letters (Ә, Ұ, Ң, Ө, Ү...)
do not exist in CP1251, so such text can only arrive correctly as UTF-8 (or be emptied); text
inside elements whose VR is unknown (UN, unknown private tags) cannot be decoded and is left as is.

Performance: a value that is pure ASCII with no ESC decodes identically under every character set
and takes a fast path; the elements built are pydicom's own types, created already converted and
put straight into the dataset (see the comment in ``_Walk.dataset``). Measured on a 150-element
CT header, all ASCII: about 65 us in explicit VR, 115 us in implicit VR (VR lookups); every
sequence adds pydicom's own parsing of it (about 60 us for a small one), which walking it needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import DicomDictionary, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.hooks import hooks
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import PersonName

__all__ = ["CharsetReport", "normalize_charset", "MAX_DEPTH", "TARGET_CHARSET"]

MAX_DEPTH = 64
TARGET_CHARSET = "ISO_IR 192"
SPECIFIC_CHARACTER_SET = 0x00080005

TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
# VRs the walk skips at once: neither charset-affected nor a sequence, nor to be resolved (UN)
_UNAFFECTED_VRS = frozenset(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "OB", "OD", "OF", "OL", "OV"}
    | {"OW", "SL", "SS", "SV", "TM", "UI", "UL", "UR", "US", "UV"}
    | {"OB or OW", "US or SS", "US or OW", "US or SS or OW"}
)
# VRs whose value is one string where "\" is an ordinary character (PS3.5 6.2)
SINGLE_VALUE_VRS = frozenset({"ST", "LT", "UT"})

ESC = 0x1B
_ESC_BYTES = b"\x1b"


@dataclass
class CharsetReport:
    """What :func:`normalize_charset` found.

    ``declared`` is the top-level Specific Character Set as declared (values joined by ``\\``,
    ``''`` if none); ``fallbacks`` counts values decoded with a character set other than the
    declared one (mislabelled); ``undecodable`` lists the tags (ints, at any depth) whose value
    could not be decoded confidently and was emptied."""

    declared: str = ""
    fallbacks: int = 0
    undecodable: list[int] = field(default_factory=list)


class _Invalid(ValueError):
    """The bytes are not valid in the character set tried."""


# -- the graphic sets of PS3.3 Tables C.12-2 to C.12-4 -------------------------------------------
@dataclass(frozen=True)
class _GSet:
    """One graphic character set: invoked in GL (G0) or GR (G1), single or multi-byte."""

    ir: str  # ISO-IR registration number, for reading
    codec: str  # Python codec; for a G1 set it also decodes GL bytes as ASCII
    g1: bool
    wide: bool = False
    escape: bytes = b""  # the designating escape sequence
    invalid: re.Pattern[bytes] | None = None  # bytes the set does not define


_C1 = re.compile(rb"[\x80-\x9f]")  # ISO 8859 G1 sets are 0xA0-0xFF only
_NOT_KATAKANA = re.compile(rb"[\x80-\xa0\xe0-\xff]")  # JIS X 0201 katakana are 0xA1-0xDF

ASCII = _GSet("6", "ascii", False, escape=b"\x1b(B")
ROMAJI = _GSet("14", "ascii", False, escape=b"\x1b(J")  # Python's JIS X 0201 maps GL like ASCII
KATAKANA = _GSet("13", "shift_jis", True, escape=b"\x1b)I", invalid=_NOT_KATAKANA)
JIS_X_0208 = _GSet("87", "iso2022_jp", False, wide=True, escape=b"\x1b$B")
JIS_X_0212 = _GSet("159", "iso2022_jp_2", False, wide=True, escape=b"\x1b$(D")
KS_X_1001 = _GSet("149", "euc_kr", True, wide=True, escape=b"\x1b$)C")
GB_2312 = _GSet("58", "gb2312", True, wide=True, escape=b"\x1b$)A")


def _latin(ir: str, codec: str, final: bytes) -> _GSet:
    return _GSet(ir, codec, True, escape=b"\x1b-" + final, invalid=_C1)


# term number -> the sets it brings (PS3.3 Tables C.12-2, C.12-3, C.12-4)
_SETS_BY_IR: dict[str, tuple[_GSet, ...]] = {
    "6": (ASCII,),
    "100": (_latin("100", "latin_1", b"A"),),
    "101": (_latin("101", "iso8859_2", b"B"),),
    "109": (_latin("109", "iso8859_3", b"C"),),
    "110": (_latin("110", "iso8859_4", b"D"),),
    "144": (_latin("144", "iso8859_5", b"L"),),
    "127": (_latin("127", "iso8859_6", b"G"),),
    "126": (_latin("126", "iso8859_7", b"F"),),
    "138": (_latin("138", "iso8859_8", b"H"),),
    "148": (_latin("148", "iso8859_9", b"M"),),
    "203": (_latin("203", "iso8859_15", b"b"),),
    "166": (_latin("166", "tis_620", b"T"),),
    "13": (KATAKANA, ROMAJI),
    "87": (JIS_X_0208,),
    "159": (JIS_X_0212,),
    "149": (KS_X_1001,),
    "58": (GB_2312,),
}
# ISO_IR terms allowed without code extensions (the multi-byte sets need ISO 2022)
_NO_EXTENSION_IRS = frozenset(
    {"6", "100", "101", "109", "110", "144", "127", "126", "138", "148", "203", "166", "13"}
)
_STANDALONE = {"ISO_IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk"}

# kinds of declaration, deciding which mislabel heuristics apply
_UNDECLARED = "undeclared"  # none, ISO_IR 6, ISO 2022 IR 6 alone, or a term we do not know
_LATIN1 = "latin1"  # ISO_IR 100 or ISO 2022 IR 100 alone
_STANDALONE_KIND = "standalone"  # ISO_IR 192, GB18030, GBK
_OTHER = "other"


@dataclass(frozen=True)
class _Charset:
    label: str
    kind: str
    codec: str | None = None  # stand-alone sets: decode the whole value with it
    g0: _GSet = ASCII
    g1: _GSet | None = None
    escapes: Mapping[bytes, _GSet] = field(default_factory=dict)


_IR_TERM = re.compile(r"ISO[ _-]?IR[ _-]?(\d+)")
_2022_TERM = re.compile(r"ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)")


def _normalise_term(term: str) -> str:
    """Defined term with common misspellings corrected (``ISO-IR 100``, ``ISO_IR_192``, ``UTF-8``)."""
    t = term.strip(" \x00").upper()
    if not t or t in _STANDALONE:
        return t
    if t in ("UTF-8", "UTF8"):
        return "ISO_IR 192"
    if m := _2022_TERM.fullmatch(t):
        return f"ISO 2022 IR {int(m[1])}"
    if m := _IR_TERM.fullmatch(t):
        return "ISO_IR 192" if m[1] == "192" else f"ISO_IR {int(m[1])}"
    return t


def _ir_of(term: str) -> str | None:
    """The registration number of an ISO_IR / ISO 2022 IR term, if we know its sets."""
    for prefix in ("ISO 2022 IR ", "ISO_IR "):
        if term.startswith(prefix):
            ir = term[len(prefix) :]
            if ir in _SETS_BY_IR and (prefix == "ISO 2022 IR " or ir in _NO_EXTENSION_IRS):
                return ir
    return None


@lru_cache(maxsize=256)
def _charset(terms: tuple[str, ...]) -> _Charset:
    """The decoding rules for the values of (0008,0005)."""
    label = "\\".join(terms)
    norm = [_normalise_term(t) for t in terms] or [""]
    first = norm[0]
    if first in _STANDALONE:  # PS3.5 6.1.2.5.4 d: no code extensions; pydicom ignores the rest
        return _Charset(label, _STANDALONE_KIND, codec=_STANDALONE[first])
    if len(norm) == 1:
        ir = _ir_of(first)
        if first == "" or ir in (None, "6"):
            ascii_escape = {ASCII.escape: ASCII} if first == "ISO 2022 IR 6" else {}
            return _Charset(label, _UNDECLARED, escapes=ascii_escape)
        sets = _SETS_BY_IR[ir]
        g0 = next((s for s in sets if not s.g1), ASCII)
        g1 = next((s for s in sets if s.g1), None)
        kind = _LATIN1 if ir == "100" else _OTHER
        escapes = {s.escape: s for s in (ASCII, *sets)} if first.startswith("ISO 2022") else {}
        return _Charset(label, kind, g0=g0, g1=g1, escapes=escapes)

    # code extensions: value 1 (empty means ISO 2022 IR 6) is designated initially
    escapes: dict[bytes, _GSet] = {ASCII.escape: ASCII}
    initial: tuple[_GSet, ...] = ()
    for i, term in enumerate(norm):
        ir = "6" if (i == 0 and term == "") else _ir_of(term)
        if ir is None:  # unknown or stand-alone in a later value: ignored, so are its escapes
            continue
        sets = _SETS_BY_IR[ir]
        escapes.update({s.escape: s for s in sets})
        if i == 0:
            initial = sets
    g0 = next((s for s in initial if not s.g1), ASCII)
    g1 = next((s for s in initial if s.g1), None)
    return _Charset(label, _OTHER, g0=g0, g1=g1, escapes=escapes)


def _terms(elem: DataElement | RawDataElement | None) -> tuple[str, ...]:
    """The values of a (0008,0005) element, raw or converted."""
    if elem is None or elem.value is None:
        return ()
    value: Any = elem.value
    if isinstance(value, bytes):
        values = value.decode("latin_1").split("\\")
    elif isinstance(value, str):
        values = value.split("\\")
    else:
        values = [str(v) for v in value]
    values = [v.strip(" \x00") for v in values]
    return () if not any(values) else tuple(values)


# -- strict decoding with the declared character set ---------------------------------------------
_DELIMS = {
    "text": re.compile(rb"[\t\n\f\r\\]"),  # SH, LO, UC: multi-valued
    "single": re.compile(rb"[\t\n\f\r]"),  # ST, LT, UT
    "PN": re.compile(rb"[\t\n\f\r\\^=]"),
}
_GR_RUNS = re.compile(rb"([\x80-\xff]+)")
# control characters other than TAB, LF, FF, CR; C1 controls; DEL; the replacement character
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")


def _decode_gl(run: bytes, g0: _GSet) -> str:
    if g0.wide:
        return (g0.escape + run).decode(g0.codec)
    return run.decode("ascii")


def _decode_gr(run: bytes, g1: _GSet | None) -> str:
    if g1 is None or (g1.invalid is not None and g1.invalid.search(run)):
        raise _Invalid
    return run.decode(g1.codec)


def _decode_run(run: bytes, g0: _GSet, g1: _GSet | None) -> str:
    """Bytes without escapes under one designation (GL bytes by G0, GR bytes by G1)."""
    if run.isascii():
        return _decode_gl(run, g0)
    if not g0.wide:
        return _decode_gr(run, g1)
    parts = _GR_RUNS.split(run)  # even indices GL, odd GR
    return "".join(
        _decode_gl(p, g0) if i % 2 == 0 else _decode_gr(p, g1) for i, p in enumerate(parts) if p
    )


def _decode_iso2022(raw: bytes, cs: _Charset, delims: re.Pattern[bytes], reset: bool) -> str:
    g0, g1 = cs.g0, cs.g1
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        if raw[i] == ESC:
            seq = raw[i : i + 3]
            if seq in (b"\x1b$(", b"\x1b$)"):
                seq = raw[i : i + 4]
            gset = cs.escapes.get(seq)
            if gset is None:
                raise _Invalid  # an escape of a set that was not declared
            if gset.g1:
                g1 = gset
            else:
                g0 = gset
            i += len(seq)
            continue
        end = raw.find(_ESC_BYTES, i)
        if end < 0:
            end = n
        # a multi-byte G0 set takes GL bytes in pairs: "^" may be half a character there
        m = None if (g0.wide or not reset) else delims.search(raw, i, end)
        if m is None:
            out.append(_decode_run(raw[i:end], g0, g1))
            i = end
        else:
            k = m.start()
            out.append(_decode_run(raw[i:k], g0, g1))
            out.append(chr(raw[k]))
            g0, g1 = cs.g0, cs.g1  # PS3.5 6.1.2.5.3
            i = k + 1
    return "".join(out)


def _decode_declared(raw: bytes, cs: _Charset, delims: re.Pattern[bytes]) -> str | None:
    """``raw`` decoded strictly with the declared character set, or None if it is not valid."""
    try:
        if cs.codec is not None:
            text = raw.decode(cs.codec)
        elif _ESC_BYTES not in raw:
            text = _decode_run(raw, cs.g0, cs.g1)
        elif not cs.escapes:
            return None
        else:
            try:
                text = _decode_iso2022(raw, cs, delims, reset=True)
            except (UnicodeDecodeError, _Invalid):
                text = _decode_iso2022(raw, cs, delims, reset=False)
    except (UnicodeDecodeError, _Invalid):
        return None
    return None if _BAD_CHARS.search(text) else text


# -- mislabel detection --------------------------------------------------------------------------
def _strict(raw: bytes, codec: str) -> str | None:
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        return None
    return None if _BAD_CHARS.search(text) else text


_GB2312_LEVEL1 = re.compile(rb"(?:[\x00-\x7f]|[\xb0-\xd7][\xa1-\xfe]|\xa1\xa4)+")
_CJK_IDEOGRAPH = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_NOT_CJK = re.compile(
    "[^\x00-\x7f\u00b7\u3000-\u303f\u30fb\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]"
)


_IDEOGRAPH_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# a GBK trail byte may be an ASCII letter (0x40-0x7E): "ü" + "l" of Latin-1 "Müller" is 黮,
# so an ideograph touching a Latin letter means Latin text read as GB, not a Chinese name
_IDEOGRAPH_TOUCHES_LATIN = re.compile(f"[A-Za-z][{_IDEOGRAPH_CLASS}]|[{_IDEOGRAPH_CLASS}][A-Za-z]")


def _as_gb18030(raw: bytes, level1_only: bool) -> str | None:
    """GB18030 text that looks Chinese: all non-ASCII characters CJK, none touching a Latin
    letter, and at least half the ideographs from GB2312 (names use a rare GBK character now and
    then, 陶喆; random bytes pair mostly into GBK's rare extension rows, 0x81-0xA0)."""
    if level1_only and not _GB2312_LEVEL1.fullmatch(raw):
        return None
    text = _strict(raw, "gb18030")
    if text is None or _NOT_CJK.search(text) or _IDEOGRAPH_TOUCHES_LATIN.search(text):
        return None
    ideographs = _CJK_IDEOGRAPH.findall(text)
    if not ideographs:
        return None
    if not level1_only and 2 * sum(map(_in_gb2312, ideographs)) < len(ideographs):
        return None
    return text


def _in_gb2312(char: str) -> bool:
    try:
        char.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return True


_CP1251_UPPER = frozenset(range(0xC0, 0xE0)) | {0xA8, 0xAA, 0xAF, 0xB2, 0xA1, 0xA5}  # Ё Є Ї І Ў Ґ
_CP1251_LOWER = frozenset(range(0xE0, 0x100)) | {0xB8, 0xBA, 0xBF, 0xB3, 0xA2, 0xB4}
_CP1251_PUNCT = bytes(
    [0xA0, 0xAB, 0xBB, 0xB9, 0x96, 0x97, 0x91, 0x92, 0x93, 0x94, 0x85]
)  # «»№–—‘’“”…
_CP1251_ALLOWED = bytes(sorted(_CP1251_UPPER | _CP1251_LOWER)) + _CP1251_PUNCT
_CP1251_WORD = re.compile(
    b"[A-Za-z" + re.escape(bytes(sorted(_CP1251_UPPER | _CP1251_LOWER))) + b"]+"
)


def _as_cp1251(raw: bytes) -> str | None:
    if not raw.translate(None, _CP1251_ALLOWED).isascii():
        return None  # a byte that is neither a Cyrillic letter nor common punctuation
    two_letters = False
    for word in _CP1251_WORD.findall(raw):
        if word.isascii():
            continue
        cases = [b in _CP1251_UPPER for b in word if b >= 0x80]
        if len(cases) * 2 <= len(word):
            return None  # mostly ASCII letters: accents in a Latin word (Müller)
        if any(cases[1:]) and not all(cases):
            return None  # neither UPPER, lower nor Capitalised
        two_letters = two_letters or len(cases) >= 2
    return _strict(raw, "cp1251") if two_letters else None


_LATIN_WORD = re.compile(rb"[A-Za-z\x8a\x8c\x8e\x9a\x9c\x9e\x9f\xc0-\xd6\xd8-\xf6\xf8-\xff]+")


def _as_latin(raw: bytes, plausible_only: bool) -> str | None:
    """Windows-1252 (a superset of Latin-1's graphic characters)."""
    if plausible_only:
        for word in _LATIN_WORD.findall(raw):
            accented = sum(b >= 0x80 for b in word)
            if len(word) > 1 and accented * 2 > len(word):
                return None
    return _strict(raw, "cp1252")


def _decode_text(raw: bytes, cs: _Charset, delims: re.Pattern[bytes]) -> tuple[str | None, bool]:
    """(text, decoded with a fallback) for a non-ASCII or escaped value; text None if undecodable."""
    declared = _decode_declared(raw, cs, delims)
    if declared is not None and cs.kind not in (_UNDECLARED, _LATIN1):
        return declared, False
    gb = cs.kind != _OTHER
    guess = _strict(raw, "utf-8")
    if guess is None:
        cyrillic = _as_cp1251(raw)
        chinese = _as_gb18030(raw, level1_only=True) if gb else None
        if cyrillic is not None and chinese is not None:
            # Capital letters in CP1251 (0xC0-0xDF) also pair as level-1 hanzi: ИВАНОВ is 尤铝贤.
            # Lower-case ones (0xE0-0xFF) never lead one, so a name in capitals is the only clash.
            capitals = not any(c.islower() for c in cyrillic if c >= "\u0400")
            guess = cyrillic if capitals else chinese
        else:
            guess = chinese if chinese is not None else cyrillic
    if guess is not None:
        return guess, True
    if declared is not None:
        return declared, False
    if gb:
        guess = _as_gb18030(raw, level1_only=False)
    if guess is None and cs.kind in (_UNDECLARED, _LATIN1):
        guess = _as_latin(raw, plausible_only=cs.kind == _UNDECLARED)
    return guess, guess is not None


# -- the walk ------------------------------------------------------------------------------------
def _person_name(value: str) -> PersonName:
    return PersonName(value, validation_mode=config.IGNORE)


def _value_for(text: str, vr: str) -> Any:
    """The pydicom value of a decoded string: str, PersonName or a MultiValue of them."""
    if vr in SINGLE_VALUE_VRS:
        return text.rstrip("\x00 ")
    if "\\" not in text:
        text = text.rstrip("\x00 ")
        return _person_name(text) if vr == "PN" and text else text
    parts = [p.rstrip("\x00 ") for p in text.split("\\")]
    return MultiValue(_person_name if vr == "PN" else str, parts)


@dataclass
class _Walk:
    report: CharsetReport

    def decode(self, raw: bytes, cs: _Charset, vr: str, tag: int) -> str | None:
        """``raw`` as text, None if undecodable (reported); ``raw`` has no trailing padding."""
        if raw.isascii() and _ESC_BYTES not in raw:
            return raw.decode("ascii")  # the same in every character set
        delims = _DELIMS["PN" if vr == "PN" else "single" if vr in SINGLE_VALUE_VRS else "text"]
        text, fallback = _decode_text(raw, cs, delims)
        if text is None:
            self.report.undecodable.append(int(tag))
        elif fallback:
            self.report.fallbacks += 1
        return text

    def dataset(self, ds: Dataset, inherited: _Charset, depth: int, top: bool) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"sequences are nested deeper than {MAX_DEPTH} levels")
        own = _terms(ds.get_item(SPECIFIC_CHARACTER_SET, keep_deferred=True))
        cs = _charset(own) if own else inherited
        if top:
            self.report.declared = "\\".join(own)
        # This loop runs for every element of every instance received, so it is kept flat and
        # writes each converted element straight into the dataset's dict. Dataset.__setitem__
        # would cost 1-3 us an element (tag checks, a debug line formatted for every private
        # tag, the private creator looked up through __getitem__), as much as all the rest of
        # the work on a CT header; the slot exists and holds a raw element of the same tag
        # (never Pixel Data, never a sequence), so the only part of it that matters here,
        # noting the private creator, is done here.
        slots = ds._dict
        creators: dict[int, str] = {}  # private creator tag -> its value, as converted here
        for tag, elem in list(ds.items()):
            vr = elem.VR
            if vr in _UNAFFECTED_VRS:
                continue  # not charset-affected, Pixel Data and other bulk included: untouched
            if not isinstance(elem, RawDataElement):
                if vr in TEXT_VRS:
                    self.converted_element(elem, cs)
                elif vr == "SQ":
                    self.sequence(elem, cs, depth)
                continue
            if vr is None or vr == "UN":
                vr = _resolve_vr(ds, elem, creators)
            if vr == "SQ":
                self.sequence(ds[tag], cs, depth)
                continue
            if vr not in TEXT_VRS:
                continue
            value = elem.value
            if value is None and elem.length:  # a deferred read: fetch the bytes, do not convert
                value = _read_deferred(ds, elem).value
            new: Any
            if not value:
                new = empty_value_for_VR(vr)
            else:
                raw = value.rstrip(b"\x00 ")
                if raw.isascii() and _ESC_BYTES not in raw:  # fast path, as in decode()
                    text: str | None = raw.decode("ascii")
                else:
                    text = self.decode(raw, cs, vr, tag)
                if text is None:
                    new = None
                elif vr != "PN" and "\\" not in text:
                    new = text
                else:
                    new = _value_for(text, vr)
            converted = DataElement(tag, vr, new, elem.value_tell, already_converted=True)
            if tag & 0x10000:  # odd group: private
                if tag & 0xFF00:
                    converted.private_creator = _creator_of(ds, tag, creators)
                elif isinstance(new, str):
                    creators[int(tag)] = new
            slots[tag] = converted
        if not top and SPECIFIC_CHARACTER_SET in ds:
            del ds[SPECIFIC_CHARACTER_SET]

    def sequence(self, elem: DataElement, cs: _Charset, depth: int) -> None:
        for item in elem.value or ():
            self.dataset(item, cs, depth + 1, top=False)

    def converted_element(self, elem: DataElement, cs: _Charset) -> None:
        """Values already converted: str stays; bytes (and PN built from bytes) are decoded."""
        value = elem.value
        if isinstance(value, bytes | PersonName):
            raw = _undecoded(value)
            if raw is not None:
                text = self.decode(raw.rstrip(b"\x00 "), cs, elem.VR, elem.tag)
                elem.value = None if text is None else _value_for(text, elem.VR)
            return
        if isinstance(value, str) or value is None or not isinstance(value, Iterable):
            return
        items = list(value)
        raws = [_undecoded(v) for v in items]
        if all(r is None for r in raws):
            return
        texts: list[str] = []
        for item, raw in zip(items, raws, strict=True):
            if raw is None:
                text: str | None = str(item)
            else:
                text = self.decode(raw.rstrip(b"\x00 "), cs, elem.VR, elem.tag)
            if text is None:
                elem.value = None
                return
            texts.append(text)
        elem.value = _value_for("\\".join(texts), elem.VR)


def _undecoded(value: Any) -> bytes | None:
    """The bytes of a value nobody has decoded with a character set yet, else None."""
    if isinstance(value, bytes):
        return value
    # a PersonName set from bytes keeps them and has no encodings until decoded by pydicom
    if (
        isinstance(value, PersonName)
        and isinstance(value.original_string, bytes)
        and not value.encodings
    ):
        return value.original_string
    return None


def _resolve_vr(ds: Dataset, raw: RawDataElement, creators: dict[int, str]) -> str:
    """The VR pydicom would give an implicit-VR or UN raw element, found without converting it.

    Public tags and private ones (PS3.5 7.8.1) follow the rules of pydicom's default
    ``raw_element_vr`` hook, with the private dictionary lookups cached (pydicom's take 2 us
    each, and a CT header has dozens); the rest (UN in explicit VR, repeating groups, unknown
    tags) goes to the hook itself.
    """
    tag = raw.tag
    if raw.VR is None:
        entry = DicomDictionary.get(int(tag))  # int: BaseTag.__eq__ is slow Python
        if entry is not None:
            return entry[0]
        if tag & 0x10000:  # odd group: private
            element = tag & 0xFFFF
            if element < 0x100:
                return "LO" if element >= 0x10 else "UN"  # a private creator
            creator = _creator_of(ds, tag, creators)
            return _private_vr(creator, tag >> 16, element & 0xFF) if creator else "UN"
    data: dict[str, Any] = {}
    try:
        hooks.raw_element_vr(raw, data, encoding=None, ds=ds, **hooks.raw_element_kwargs)
    except Exception:  # an unreadable private creator, say: the bytes stay as they are
        return "UN"
    return str(data.get("VR") or "UN")


@lru_cache(maxsize=4096)
def _private_vr(creator: str, group: int, element: int) -> str:
    try:
        return private_dictionary_VR((group << 16) | 0x1000 | element, creator)
    except KeyError:
        return "UN"


def _creator_of(ds: Dataset, tag: int, creators: dict[int, str]) -> str | None:
    """The private creator of a private data element (its block's (gggg,00xx) value)."""
    creator_tag = (tag & 0xFFFF0000) | ((tag & 0xFF00) >> 8)
    creator = creators.get(creator_tag)
    if creator is None:
        found = ds.get_item(creator_tag, keep_deferred=True)
        if isinstance(found, DataElement) and isinstance(found.value, str):
            creator = found.value
    return creator


def _read_deferred(ds: Dataset, raw: RawDataElement) -> RawDataElement:
    src = ds.filename or ds.buffer
    if ds.filename and ds.buffer and not getattr(ds.buffer, "closed", False):
        src = ds.buffer
    return read_deferred_data_element(ds.fileobj_type, src, ds.timestamp, raw)


def normalize_charset(ds: Dataset) -> CharsetReport:
    """Decode every SH, LO, ST, LT, UC, UT and PN value of ``ds`` (at every depth) into ``str``,
    detect mislabelled values, empty undecodable ones, and declare ``ISO_IR 192`` (in place).

    The top level gets ``SpecificCharacterSet = 'ISO_IR 192'``; (0008,0005) is removed from
    nested items rather than set to ``ISO_IR 192``: an item without it inherits its parent's
    character set (PS3.3 C.12.1.1.2), so the whole object has one declaration, written once, and
    no item can later disagree with the top level. Elements of other VRs, Pixel Data included,
    are left exactly as they were (raw elements stay raw).

    Raises ValueError if sequences are nested deeper than :data:`MAX_DEPTH`.
    """
    report = CharsetReport()
    _Walk(report).dataset(ds, _charset(()), 0, top=True)
    ds.SpecificCharacterSet = TARGET_CHARSET
    if not _needs_vr_lookup(ds):
        _settle(ds, 0)
    return report


def _needs_vr_lookup(ds: Dataset) -> bool:
    """True when raw elements carry no VR (read as implicit VR) but the file says explicit VR, as
    in some broken files: pydicom must then convert every element (looking up its VR) to write
    them, which is what it does when it sees the character set change, so nothing is settled."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        implicit_out = UID(ts).is_implicit_VR if ts else bool(ds.original_encoding[0])
    except (ValueError, AttributeError):
        return True
    if implicit_out:
        return False
    return any(isinstance(e, RawDataElement) and e.VR is None for e in ds._dict.values())


def _settle(ds: Dataset, depth: int) -> None:
    """Tell pydicom the character set is settled. Every text value is now a ``str``; what is left
    raw (numbers, UIDs, codes, bulk data, unknown private bytes) is encoded the same under any
    character set. Without this, pydicom sees the declaration change and, when writing, decodes
    and re-encodes every raw element of the dataset (about 1.5 ms of a CT header's 2 ms)."""
    if depth > MAX_DEPTH:
        return
    ds._read_charset = ds._character_set  # pydicom < 4: the charset the raw values were read with
    for elem in ds._dict.values():
        if isinstance(elem, DataElement) and elem.VR == "SQ" and elem.value:
            for item in elem.value:
                _settle(item, depth + 1)
