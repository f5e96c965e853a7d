"""Character set normalisation (imaging/charset.py): every text value decoded, mislabelling
detected, undecodable values emptied, the object re-encoded as ISO_IR 192.

Reference for correctly labelled data is pydicom's own decoding of its bundled charset files, read
from disk (``pydicom.data.get_charset_files`` could try to download). Mislabelled data is built
byte for byte: a dataset is encoded here element by element, exactly as a partner's device would
send it, and read with pydicom's reader, so the module sees raw elements as in production."""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from imaging.charset import MAX_DEPTH, CharsetReport, normalize_charset

CHARSET_FILES = sorted(Path(DATA_ROOT, "charset_files").glob("*.dcm"))
TEST_FILES = Path(DATA_ROOT, "test_files")
TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
COMPARED_VRS = ("PN", "LO", "SH")

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
INSTITUTION = 0x00080080
OTHER_NAMES = 0x00101001
SCS = 0x00080005
PIXEL_DATA = 0x7FE00010


# -- building what a partner sends, byte for byte --------------------------------------------------
def el(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element (short-length VRs only)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def long_el(tag: int, vr: str, value: bytes) -> bytes:
    """An element of a VR with a 4-byte length (OB, OW, UT, UC...)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value


def sq(tag: int, *items: bytes) -> bytes:
    """A sequence of undefined length whose items (already encoded elements) have undefined length."""
    body = b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + i + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        for i in items
    )
    return (
        struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
        + body
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


def scs(*terms: str) -> bytes:
    return el(SCS, "CS", "\\".join(terms).encode())


def received(*elements: bytes) -> Dataset:
    """The dataset as pydicom reads it from the wire: raw, unconverted elements."""
    ordered = sorted(elements, key=lambda e: struct.unpack("<HH", e[:4]))
    return read_dataset(io.BytesIO(b"".join(ordered)), is_implicit_VR=False, is_little_endian=True)


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def reread(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data), force=True)


# -- looking at the result -------------------------------------------------------------------------
def plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str | PersonName):
        return str(value)
    return [str(v) for v in value]


def text_values(
    ds: Dataset, vrs: tuple[str, ...] = COMPARED_VRS, path: tuple[int, ...] = ()
) -> dict[tuple[int, ...], Any]:
    """{path of tags and item indices: value as str or list of str}, pydicom converting as it goes."""
    out: dict[tuple[int, ...], Any] = {}
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out.update(text_values(item, vrs, (*path, int(elem.tag), i)))
        elif elem.VR in vrs:
            out[(*path, int(elem.tag))] = plain(elem.value)
    return out


def raw_text_elements(ds: Dataset) -> Iterator[RawDataElement]:
    """The charset-affected elements of a dataset just read, before any conversion, at any depth."""
    for elem in list(ds.elements()):
        if elem.VR == "SQ":
            for item in ds[elem.tag].value:
                yield from raw_text_elements(item)
        elif elem.VR in TEXT_VRS:
            assert isinstance(elem, RawDataElement)
            yield elem


def items(ds: Dataset) -> Iterator[Dataset]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield item
                yield from items(item)


def assert_all_text_converted(ds: Dataset) -> None:
    """Every charset-affected element holds decoded values, at every depth; nothing raw is left."""
    for elem in list(ds.elements()):
        if elem.VR == "SQ":
            for item in elem.value:
                assert_all_text_converted(item)
            continue
        vr = elem.VR or ds[elem.tag].VR
        if vr not in TEXT_VRS:
            continue
        assert isinstance(elem, DataElement), f"{elem.tag} is still raw"
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        for v in values:
            assert v is None or isinstance(v, str | PersonName), f"{elem.tag}: {v!r}"
            if isinstance(v, PersonName):
                assert v.original_string is None  # built from str, so written in the new charset


# -- pydicom's charset files: correctly labelled, pydicom is the reference -------------------------
@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: p.name)
def test_charset_file_is_rewritten_as_utf8_with_the_same_text(path: Path) -> None:
    original = dcmread(path)
    declared = original.get("SpecificCharacterSet")
    reference = text_values(original)  # pydicom's own decoding
    assert reference

    ds = dcmread(path)
    report = normalize_charset(ds)

    declared = declared if isinstance(declared, str) else "\\".join(declared)
    assert report == CharsetReport(declared=declared, fallbacks=0, undecodable=[])
    assert_all_text_converted(ds)
    data = encode(ds)
    back = reread(data)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert [item for item in items(back) if SCS in item] == []
    for raw in raw_text_elements(reread(data)):
        assert b"\x1b" not in raw.value
        raw.value.decode("utf-8")  # strict: raises if the file holds anything else
    assert text_values(back) == reference
    for value in reference.values():
        for v in value if isinstance(value, list) else [value]:
            assert v.encode("utf-8") in data


@pytest.mark.parametrize("name", ["chrSQEncoding.dcm", "chrSQEncoding1.dcm"])
def test_nested_item_charset_is_honoured_then_dropped(name: str) -> None:
    """chrSQEncoding: UTF-8 at the top, the item in ISO 2022 IR 13 + IR 87 (Japanese);
    chrSQEncoding1: the item inherits ISO 2022 IR 13 + IR 87 from the top."""
    ds = dcmread(Path(DATA_ROOT, "charset_files", name))
    normalize_charset(ds)
    item = ds.RequestedProcedureCodeSequence[0]
    assert SCS not in item
    assert str(item.PatientName) == "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    back = reread(encode(ds)).RequestedProcedureCodeSequence[0]
    assert str(back.PatientName) == "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize(
    ("name", "groups"),
    [
        ("chrH31.dcm", ("Yamada^Tarou", "山田^太郎", "やまだ^たろう")),
        ("chrI2.dcm", ("Hong^Gildong", "洪^吉洞", "홍^길동")),
        ("chrH32.dcm", ("ﾔﾏﾀﾞ^ﾀﾛｳ", "山田^太郎", "やまだ^たろう")),
    ],
)
def test_iso2022_person_name_keeps_its_component_groups(
    name: str, groups: tuple[str, str, str]
) -> None:
    """Each group uses its own escapes; "^" and "=" restore the initial set (PS3.5 6.1.2.5.3)."""
    ds = dcmread(Path(DATA_ROOT, "charset_files", name))
    normalize_charset(ds)
    pn = reread(encode(ds)).PatientName
    assert (pn.alphabetic, pn.ideographic, pn.phonetic) == groups


# -- mislabelled and correctly labelled values built byte for byte ---------------------------------
IVANOV = "Иванов^Иван"
CASES = [
    # (id, Specific Character Set values, PN bytes as sent, expected text, fallbacks)
    ("cyrillic-iso-ir-144", ["ISO_IR 144"], IVANOV.encode("iso8859_5"), IVANOV, 0),
    ("cp1251-declared-latin1", ["ISO_IR 100"], IVANOV.encode("cp1251"), IVANOV, 1),
    ("cp1251-undeclared", [], IVANOV.encode("cp1251"), IVANOV, 1),
    ("cp1251-uppercase-undeclared", [], "ИВАНОВ^ИВАН".encode("cp1251"), "ИВАНОВ^ИВАН", 1),
    ("cp1251-declared-utf8", ["ISO_IR 192"], "Ёлкин^Пётр".encode("cp1251"), "Ёлкин^Пётр", 1),
    ("utf8-undeclared", [], IVANOV.encode(), IVANOV, 1),
    ("utf8-declared-latin1", ["ISO_IR 100"], "Müller^Jürgen".encode(), "Müller^Jürgen", 1),
    ("gb18030", ["GB18030"], "王小明".encode("gb18030"), "王小明", 0),
    ("gbk", ["GBK"], "王^小明".encode("gbk"), "王^小明", 0),
    ("gb18030-undeclared", [], "王小明".encode("gb18030"), "王小明", 1),
    (
        "gbk-undeclared-with-alphabetic-group",
        [],
        "Wang^XiaoMing=王^小明".encode("gbk"),
        "Wang^XiaoMing=王^小明",
        1,
    ),
    ("gbk-uyghur-name-with-middle-dot", [], "阿依古丽·买买提".encode("gbk"), "阿依古丽·买买提", 1),
    ("gbk-declared-utf8", ["ISO_IR 192"], "王小明".encode("gbk"), "王小明", 1),
    ("gbk-rare-character-undeclared", [], "陶^喆".encode("gbk"), "陶^喆", 1),
    ("utf8-declared-iso-ir-6", ["ISO_IR 6"], IVANOV.encode(), IVANOV, 1),
    ("kyrgyz-utf8", ["ISO_IR 192"], "Асанов^Бакыт".encode(), "Асанов^Бакыт", 0),
    ("kazakh-utf8", ["ISO_IR 192"], "Әбенов^Нұрлан".encode(), "Әбенов^Нұрлан", 0),
    ("kazakh-utf8-undeclared", [], "Әбенов^Нұрлан".encode(), "Әбенов^Нұрлан", 1),
    ("latin1-stays-latin1", ["ISO_IR 100"], "Müller^Jürgen".encode("latin_1"), "Müller^Jürgen", 0),
    ("latin1-accents-stay-latin1", ["ISO_IR 100"], "Buc^Jérôme".encode("latin_1"), "Buc^Jérôme", 0),
    (
        "latin1-uppercase-pairs-stay-latin1",
        ["ISO_IR 100"],
        "CONCEIÇÃO^JOSÉ".encode("latin_1"),
        "CONCEIÇÃO^JOSÉ",
        0,
    ),
    # ÇÃ (0xC7 0xC3) is also a level-1 hanzi in GB2312: Latin letters around it say it is not
    (
        "latin1-pair-like-a-hanzi",
        ["ISO_IR 100"],
        "CONCEIÇÃO^MARIA".encode("latin_1"),
        "CONCEIÇÃO^MARIA",
        0,
    ),
    ("latin1-undeclared", [], "Müller^Jürgen".encode("latin_1"), "Müller^Jürgen", 1),
    (
        "windows-1252-declared-latin1",
        ["ISO_IR 100"],
        "O’Brien^Seán".encode("cp1252"),
        "O’Brien^Seán",
        1,
    ),
    ("misspelt-term", ["ISO-IR 144"], IVANOV.encode("iso8859_5"), IVANOV, 0),
    (
        "iso2022-latin1-then-cyrillic",
        ["ISO 2022 IR 100", "ISO 2022 IR 144"],
        b"M\xfcller^\x1b-L" + "Иван".encode("iso8859_5"),
        "Müller^Иван",
        0,
    ),
    (
        # PS3.5 6.1.2.5.3: the value-1 set is active again after "^", without a new escape
        "iso2022-delimiter-restores-value-1",
        ["ISO 2022 IR 100", "ISO 2022 IR 144"],
        b"\x1b-L" + "Иван".encode("iso8859_5") + b"^M\xfcller",
        "Иван^Müller",
        0,
    ),
    (
        "iso2022-ir58-chinese",
        ["", "ISO 2022 IR 58"],
        b"Wang^XiaoMing=\x1b$)A" + "王".encode("gb2312") + b"^\x1b$)A" + "小明".encode("gb2312"),
        "Wang^XiaoMing=王^小明",
        0,
    ),
    (
        "iso2022-ir87-ir159-japanese",
        ["", "ISO 2022 IR 87", "ISO 2022 IR 159"],
        b"\x1b$B" + "山田".encode("iso2022_jp")[3:-3] + b"\x1b(B^\x1b$(D\x30\x21\x1b(B",
        "山田^丂",
        0,
    ),
]


@pytest.mark.filterwarnings("ignore:Incorrect value for Specific Character Set")  # pydicom, reading
@pytest.mark.parametrize(
    ("charset", "sent", "expected", "fallbacks"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_person_name_is_decoded_and_rewritten_as_utf8(
    charset: list[str], sent: bytes, expected: str, fallbacks: int
) -> None:
    ds = received(
        *([scs(*charset)] if charset else []),
        el(PATIENT_NAME, "PN", sent),
        el(PATIENT_ID, "LO", b"ID-1"),
    )

    report = normalize_charset(ds)

    assert (report.fallbacks, report.undecodable) == (fallbacks, [])
    assert report.declared == "\\".join(charset)
    assert str(ds.PatientName) == expected
    assert_all_text_converted(ds)
    data = encode(ds)
    back = reread(data)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == expected
    assert back.PatientID == "ID-1"
    assert expected.encode("utf-8") in data


@pytest.mark.parametrize(
    ("charset", "sent", "expected", "fallbacks"),
    [
        (
            ["ISO_IR 100"],
            IVANOV.encode("cp1251") + b"\\" + "Петров".encode("cp1251"),
            [IVANOV, "Петров"],
            1,
        ),
        (["GBK"], "北京协和医院\\上海".encode("gbk"), ["北京协和医院", "上海"], 0),
        ([], "Бишкек^Клиника\\№1".encode("cp1251"), ["Бишкек^Клиника", "№1"], 1),
        (["ISO_IR 192"], "Алматы\\Астана".encode(), ["Алматы", "Астана"], 0),
    ],
    ids=["cp1251-declared-latin1", "gbk-trail-byte-0x5c", "cp1251-undeclared", "utf8"],
)
def test_multi_valued_long_string(
    charset: list[str], sent: bytes, expected: list[str], fallbacks: int
) -> None:
    """LO values split on the backslash after decoding: a GBK trail byte may be 0x5C (协 is 0xD0 0x5C)."""
    ds = received(*([scs(*charset)] if charset else []), el(INSTITUTION, "LO", sent))
    report = normalize_charset(ds)
    assert report.fallbacks == fallbacks
    assert list(ds.InstitutionName) == expected
    assert list(reread(encode(ds)).InstitutionName) == expected


def test_text_vr_keeps_backslash_and_line_breaks() -> None:
    text = "Жалобы: боль\\тяжесть\r\nДиагноз: —"
    ds = received(scs("ISO_IR 100"), el(0x00104000, "LT", text.encode("cp1251")))
    report = normalize_charset(ds)
    assert report.fallbacks == 1
    assert ds.PatientComments == text
    assert reread(encode(ds)).PatientComments == text


@pytest.mark.parametrize(
    ("charset", "sent"),
    [
        (["ISO_IR 192"], b"\xff\xfe\x00\x81"),
        (["ISO_IR 192"], "Иванов".encode()[:-1]),  # cut inside a character
        # not guessed: Latin-1 is no fallback for a UTF-8 declaration
        (["ISO_IR 192"], "Müller".encode("latin_1")),
        (["", "ISO 2022 IR 87"], b"\x1b$)C\xb1\xe8"),  # escape to a set that was not declared
        (["ISO_IR 100"], b"Ab\x00\x81cd\x90"),  # controls, and bytes no fallback defines
        ([], b"\x81\x81\x81\x81"),
        (["GB18030"], b"\xcd"),  # a lead byte without its trail
        (["ISO_IR 192"], "Ив\x00ан".encode()),  # valid UTF-8, but a NUL is no text
        (["ISO_IR 100"], b"M\x1bller"),  # an escape where no code extension was declared
    ],
    ids=[
        "invalid-utf8",
        "truncated-utf8",
        "latin1-declared-utf8",
        "undeclared-escape",
        "controls",
        "garbage-undeclared",
        "truncated-gb18030",
        "nul-in-utf8",
        "escape-in-latin1",
    ],
)
def test_undecodable_value_is_emptied_and_reported(charset: list[str], sent: bytes) -> None:
    ds = received(
        *([scs(*charset)] if charset else []),
        el(PATIENT_NAME, "PN", sent),
        el(PATIENT_ID, "LO", b"ID-1"),
    )

    report = normalize_charset(ds)

    assert report.undecodable == [PATIENT_NAME]
    assert report.fallbacks == 0
    assert ds[PATIENT_NAME].value is None
    data = encode(ds)
    assert sent.rstrip(b" ") not in data
    back = reread(data)
    assert back[PATIENT_NAME].is_empty
    assert back.PatientID == "ID-1"


def test_nested_sequences_three_deep_with_overrides() -> None:
    """Top UTF-8; level 1 inherits it; level 2 overrides with ISO_IR 144; level 3 inherits that,
    and a sibling at level 3 overrides again with GB18030 (PS3.3 C.12.1.1.2)."""
    level3 = el(0x00080100, "SH", "КТ".encode("iso8859_5")) + el(
        PATIENT_NAME, "PN", "Петров^Пётр".encode("iso8859_5")
    )
    level3_gb = scs("GB18030") + el(PATIENT_NAME, "PN", "王小明".encode("gb18030"))
    level2 = (
        scs("ISO_IR 144")
        + el(PATIENT_NAME, "PN", IVANOV.encode("iso8859_5"))
        + sq(0x00400260, level3, level3_gb)
    )
    level1 = el(PATIENT_NAME, "PN", "Асанов^Бакыт".encode()) + sq(0x00400260, level2)
    ds = received(
        scs("ISO_IR 192"), el(PATIENT_NAME, "PN", "Әбенов^Нұрлан".encode()), sq(0x00081110, level1)
    )

    report = normalize_charset(ds)

    assert report == CharsetReport(declared="ISO_IR 192", fallbacks=0, undecodable=[])
    expected = {
        (PATIENT_NAME,): "Әбенов^Нұрлан",
        (0x00081110, 0, PATIENT_NAME): "Асанов^Бакыт",
        (0x00081110, 0, 0x00400260, 0, PATIENT_NAME): IVANOV,
        (0x00081110, 0, 0x00400260, 0, 0x00400260, 0, 0x00080100): "КТ",
        (0x00081110, 0, 0x00400260, 0, 0x00400260, 0, PATIENT_NAME): "Петров^Пётр",
        (0x00081110, 0, 0x00400260, 0, 0x00400260, 1, PATIENT_NAME): "王小明",
    }
    assert text_values(ds) == expected
    assert_all_text_converted(ds)
    back = reread(encode(ds))
    assert text_values(back) == expected
    assert [item for item in items(back) if SCS in item] == []


def test_nested_value_that_fails_is_reported_by_its_tag() -> None:
    inner = el(0x00080104, "LO", b"\xff\xfe\x00\x81")
    ds = received(scs("ISO_IR 192"), sq(0x00081032, inner))
    report = normalize_charset(ds)
    assert report.undecodable == [0x00080104]
    assert ds.ProcedureCodeSequence[0][0x00080104].value is None


def test_sequences_deeper_than_the_limit_are_refused() -> None:
    def nested(depth: int) -> Dataset:
        ds = Dataset()
        ds.PatientName = "Deep^Name"
        if depth:
            ds.ReferencedStudySequence = Sequence([nested(depth - 1)])
        return ds

    normalize_charset(nested(MAX_DEPTH))
    with pytest.raises(ValueError, match="nested deeper"):
        normalize_charset(nested(MAX_DEPTH + 1))


# -- values that are already converted ---------------------------------------------------------------
def test_values_set_as_bytes_in_code_are_decoded_and_str_values_left() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = IVANOV.encode("cp1251")  # PersonName holding bytes
    ds.add_new(INSTITUTION, "LO", "Клиника".encode("cp1251"))
    ds.add_new(OTHER_NAMES, "PN", [b"M\xfcller^J\xfcrgen", "Already^Decoded"])
    ds.PatientID = "Kept as set"

    report = normalize_charset(ds)

    assert report.fallbacks == 2
    assert str(ds.PatientName) == IVANOV
    assert ds.InstitutionName == "Клиника"
    assert [str(v) for v in ds[OTHER_NAMES].value] == ["Müller^Jürgen", "Already^Decoded"]
    assert ds.PatientID == "Kept as set"
    back = reread(encode(ds))
    assert (str(back.PatientName), back.InstitutionName) == (IVANOV, "Клиника")


def test_element_pydicom_already_decoded_is_left_alone() -> None:
    ds = received(scs("ISO_IR 144"), el(PATIENT_NAME, "PN", IVANOV.encode("iso8859_5")))
    decoded_by_pydicom = ds[PATIENT_NAME]
    normalize_charset(ds)
    assert ds[PATIENT_NAME] is decoded_by_pydicom
    assert str(reread(encode(ds)).PatientName) == IVANOV


def test_private_text_is_decoded_and_keeps_its_creator() -> None:
    ds = received(
        scs("ISO_IR 100"),
        el(0x00090010, "LO", b"ACME 1.0"),
        el(0x00091001, "LO", "Клиника".encode("cp1251")),
    )
    normalize_charset(ds)
    assert ds[0x00091001].value == "Клиника"
    assert ds[0x00091001].private_creator == "ACME 1.0"


# -- what must not be touched ------------------------------------------------------------------------
def test_pixel_data_and_other_bulk_values_are_untouched() -> None:
    pixels = bytes(range(256)) * 8  # every byte value, ESC and 0x80-0xFF included
    ds = received(
        scs("ISO_IR 100"),
        el(PATIENT_NAME, "PN", IVANOV.encode("cp1251")),
        long_el(0x00420011, "OB", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3"),  # Encapsulated Document
        long_el(PIXEL_DATA, "OW", pixels),
    )
    before = {tag: ds.get_item(tag) for tag in (PIXEL_DATA, 0x00420011)}

    normalize_charset(ds)

    for tag, raw in before.items():
        assert ds.get_item(tag) is raw  # the very same raw element: never converted
    back = reread(encode(ds))
    assert back.get_item(PIXEL_DATA).value == pixels
    assert back.get_item(0x00420011).value == b"%PDF-1.7\n%\xe2\xe3\xcf\xd3"
    assert str(back.PatientName) == IVANOV


def test_real_ct_pixel_data_bytes_identical_after_normalize_and_write() -> None:
    path = TEST_FILES / "CT_small.dcm"
    original = dcmread(path).get_item(PIXEL_DATA).value
    ds = dcmread(path)
    raw = ds.get_item(PIXEL_DATA)
    normalize_charset(ds)
    assert ds.get_item(PIXEL_DATA) is raw
    back = dcmread(io.BytesIO(encode(ds)), force=True)
    assert back.get_item(PIXEL_DATA).value == original


def _readable(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcmread(path, stop_before_pixels=True)
            return True
        except Exception:
            return False


@pytest.mark.parametrize(
    "path", [p for p in sorted(TEST_FILES.glob("*.dcm")) if _readable(p)], ids=lambda p: p.name
)
def test_correctly_labelled_files_are_not_second_guessed(path: Path) -> None:
    """pydicom's other bundled files: nothing mislabelled, so no fallback and nothing emptied, and
    the text pydicom decodes is the text we decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = text_values(dcmread(path), TEXT_VRS)
        ds = dcmread(path)
        report = normalize_charset(ds)
        assert (report.fallbacks, report.undecodable) == (0, [])
        assert text_values(ds, TEXT_VRS) == reference
