#!/usr/bin/env python3
"""Regenerate ``imaging/data/ps3_15_table_e1_1.json`` from the DICOM standard.

The data file is DICOM PS3.15 Table E.1-1 "Application Level Confidentiality
Profile Attributes" (Annex E, Attribute Confidentiality Profiles), converted to
this project's own JSON layout.  This script never touches the network: an
operator downloads one of the standard's published renderings of Part 15 and
passes its path on the command line.

Where to get the input (pick one; replace ``current`` by an edition such as
``2024c`` to pin a specific release):

* DocBook XML (preferred, it is the standard's source)::

      https://dicom.nema.org/medical/dicom/current/source/docbook/part15/part15.xml

* Chunked HTML, the single chapter holding the table::

      https://dicom.nema.org/medical/dicom/current/output/chtml/part15/chapter_E.html

* Single-page HTML of the whole part::

      https://dicom.nema.org/medical/dicom/current/output/html/part15.html

The table is located by its identifier ``table_E.1-1`` (``xml:id`` in DocBook,
an ``id`` anchor in front of the table in the HTML renderings).  Columns are
mapped by their header text, not by position, and the run fails loudly if the
header, a tag or an action code looks unfamiliar, so a layout change in a
future edition cannot silently produce a wrong file.  The edition (e.g.
``2024c``) is read from the document itself ("DICOM PS3.15 2024c - ...");
use ``--edition`` if the input does not carry it.

Usage::

    python tools/gen_e1_1.py part15.xml              # writes the default output
    python tools/gen_e1_1.py chapter_E.html -o out.json
    python tools/gen_e1_1.py part15.xml --check      # also print sanity checks

Only the standard library and pydicom (for attribute keywords) are used.
"""

from __future__ import annotations

import argparse
import html
import html.parser
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pydicom.datadict import dictionary_has_tag, keyword_for_tag

TABLE_ID = "table_E.1-1"
TABLE_TITLE = "Application Level Confidentiality Profile Attributes"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "imaging" / "data" / "ps3_15_table_e1_1.json"

# Output option columns, in the standard's column order.
COLUMNS = [
    "basic",
    "rtn_safe_priv",
    "rtn_uids",
    "rtn_dev_id",
    "rtn_inst_id",
    "rtn_pat_chars",
    "rtn_long_full_dates",
    "rtn_long_modif_dates",
    "clean_desc",
    "clean_struct_cont",
    "clean_graph",
]

# Header text (normalised: lower case, alphanumerics only) -> field.  Each
# entry is a prefix, because the "Retd." and "In Std. Comp. IOD" headers carry
# a cross reference ("(from PS3.6)") whose rendering differs between formats.
HEADER_PREFIXES = [
    ("attributename", "name"),
    ("tag", "tag"),
    ("retd", "retired"),
    ("instdcompiod", "in_std_comp_iod"),
    ("basicprof", "basic"),
    ("rtnsafepriv", "rtn_safe_priv"),
    ("rtnuids", "rtn_uids"),
    ("rtndevid", "rtn_dev_id"),
    ("rtninstid", "rtn_inst_id"),
    ("rtnpatchars", "rtn_pat_chars"),
    ("rtnlongfulldates", "rtn_long_full_dates"),
    ("rtnlongmodifdates", "rtn_long_modif_dates"),
    ("cleandesc", "clean_desc"),
    ("cleanstructcont", "clean_struct_cont"),
    ("cleangraph", "clean_graph"),
]

ACTION_CODES = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}

EDITION_RE = re.compile(r"DICOM\s+PS\s?3\.15\s+(\d{4}[a-z]?)\b")
TAG_RE = re.compile(r"^\(([0-9A-Fa-fXx]{4}),([0-9A-Fa-fXx]{4})\)$")
PRIVATE_RE = re.compile(r"^\(gggg,eeee\)\s*where\s+gggg\s+is\s+odd$", re.IGNORECASE)
NOTE_REF_RE = re.compile(r"\s*\(see\s+notes?\s+[\d,\s and]+\)\s*$", re.IGNORECASE)

DOCBOOK_NS = "http://docbook.org/ns/docbook"
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"


class TableError(ValueError):
    """The input does not contain a Table E.1-1 this script understands."""


def _clean(text: str) -> str:
    """Collapse whitespace and drop zero-width / no-break characters."""
    text = text.replace("\u200b", "").replace("\ufeff", "").replace("\u00a0", " ")
    return re.sub(r"\s+", " ", text).strip()


def _header_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


# --------------------------------------------------------------------------
# DocBook XML
# --------------------------------------------------------------------------

def _docbook_cell_text(cell: ET.Element) -> str:
    paras = [p for p in cell.iter() if p.tag in (f"{{{DOCBOOK_NS}}}para", "para")]
    if paras:
        return _clean(" ".join(_clean("".join(p.itertext())) for p in paras))
    return _clean("".join(cell.itertext()))


def read_docbook(path: Path) -> tuple[str | None, list[list[str]], list[list[str]]]:
    """Return (edition, header rows, body rows) from a Part 15 DocBook file.

    XML comments (the standard's source keeps draft rows commented out) are
    dropped by the parser and therefore never reach the output.
    """
    root = ET.parse(path).getroot()
    edition = None
    for el in root.iter():
        if el.tag in (f"{{{DOCBOOK_NS}}}subtitle", "subtitle", f"{{{DOCBOOK_NS}}}title", "title"):
            m = EDITION_RE.search("".join(el.itertext()))
            if m:
                edition = m.group(1)
                break

    table = next((el for el in root.iter() if el.get(XML_ID) == TABLE_ID), None)
    if table is None:
        raise TableError(f"no element with xml:id={TABLE_ID!r} in {path}")

    def rows_of(section: str) -> list[list[str]]:
        out = []
        for sec in table.iter():
            if sec.tag not in (f"{{{DOCBOOK_NS}}}{section}", section):
                continue
            for tr in sec:
                if tr.tag not in (f"{{{DOCBOOK_NS}}}tr", "tr"):
                    continue
                row: list[str] = []
                for cell in tr:
                    if cell.tag not in (f"{{{DOCBOOK_NS}}}td", f"{{{DOCBOOK_NS}}}th", "td", "th"):
                        continue
                    if int(cell.get("rowspan", "1")) != 1:
                        raise TableError("row-spanning cells are not supported")
                    row.extend([_docbook_cell_text(cell)] * int(cell.get("colspan", "1")))
                out.append(row)
        return out

    return edition, rows_of("thead"), rows_of("tbody")


# --------------------------------------------------------------------------
# HTML (chunked chapter page or single-page part15.html)
# --------------------------------------------------------------------------

class _TableExtractor(html.parser.HTMLParser):
    """Collect the first <table> that follows the element with id=table_E.1-1."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.seen_anchor = False
        self.depth = 0  # nesting depth of <table> once inside the target
        self.done = False
        self.section = None  # "thead" / "tbody"
        self.head: list[list[str]] = []
        self.body: list[list[str]] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.colspan = 1
        self.title_text: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "title":
            self.in_title = True
        if self.done:
            return
        if not self.seen_anchor:
            if a.get("id") == TABLE_ID or a.get("name") == TABLE_ID:
                self.seen_anchor = True
                if tag == "table":  # id placed on the table itself
                    self.depth = 1
            return
        if tag == "table":
            self.depth += 1
            return
        if self.depth != 1:
            return
        if tag in ("thead", "tbody"):
            self.section = tag
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            if int(a.get("rowspan") or 1) != 1:
                raise TableError("row-spanning cells are not supported")
            self.cell = []
            self.colspan = int(a.get("colspan") or 1)
        elif tag in ("p", "br") and self.cell is not None:
            self.cell.append(" ")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if self.done or not self.seen_anchor or self.depth == 0:
            return
        if tag == "table":
            self.depth -= 1
            if self.depth == 0:
                self.done = True
            return
        if self.depth != 1:
            return
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.extend([_clean("".join(self.cell))] * self.colspan)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            # Rows outside <thead>/<tbody>: header rows are made of <th>.
            target = self.head if self.section == "thead" else self.body
            target.append(self.row)
            self.row = None
        elif tag in ("thead", "tbody"):
            self.section = None

    def handle_data(self, data):
        if self.in_title:
            self.title_text.append(data)
        if self.cell is not None and self.depth == 1:
            self.cell.append(data)


def read_html(path: Path) -> tuple[str | None, list[list[str]], list[list[str]]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    parser = _TableExtractor()
    parser.feed(text)
    parser.close()
    if not parser.seen_anchor:
        raise TableError(f"no element with id={TABLE_ID!r} in {path}")
    if not parser.done:
        raise TableError(f"no complete <table> after id={TABLE_ID!r} in {path}")
    head, body = parser.head, parser.body
    if not head and body:  # header row not wrapped in <thead>
        head, body = body[:1], body[1:]
    m = EDITION_RE.search("".join(parser.title_text)) or EDITION_RE.search(html.unescape(text))
    return (m.group(1) if m else None), head, body


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------

def map_header(head_rows: list[list[str]]) -> list[str]:
    if len(head_rows) != 1:
        raise TableError(f"expected one header row, found {len(head_rows)}")
    fields = []
    for text in head_rows[0]:
        key = _header_key(text)
        match = [f for prefix, f in HEADER_PREFIXES if key.startswith(prefix)]
        if len(match) != 1:
            raise TableError(f"unrecognised column header {text!r}")
        fields.append(match[0])
    expected = [f for _, f in HEADER_PREFIXES]
    if sorted(fields) != sorted(expected):
        raise TableError(f"unexpected header set {head_rows[0]!r}")
    return fields


def parse_tag(text: str) -> str:
    m = TAG_RE.match(text.replace(" ", ""))
    if not m:
        raise TableError(f"unparseable tag {text!r}")
    return (m.group(1) + m.group(2)).upper()


def parse_flag(text: str, what: str, tag: str) -> bool:
    if text not in ("Y", "N"):
        raise TableError(f"{tag}: {what} is {text!r}, expected Y or N")
    return text == "Y"


def convert(head: list[list[str]], body: list[list[str]]) -> tuple[list[dict], list[str]]:
    fields = map_header(head)
    attributes: list[dict] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for row in body:
        if not any(row):
            continue
        if len(row) != len(fields):
            raise TableError(f"row has {len(row)} cells, expected {len(fields)}: {row!r}")
        cells = dict(zip(fields, row, strict=True))
        if PRIVATE_RE.match(cells["tag"]):
            skipped.append(f"{cells['name']} {cells['tag']}: basic "
                           f"{cells['basic']}, rtn_safe_priv {cells['rtn_safe_priv'] or '-'}")
            continue
        tag = parse_tag(cells["tag"])
        if tag in seen:
            raise TableError(f"duplicate tag {tag}")
        seen.add(tag)
        entry = {
            "tag": tag,
            "keyword": "" if "X" in tag else (keyword_for_tag(int(tag, 16)) or ""),
            "name": NOTE_REF_RE.sub("", cells["name"]),
            "retired": parse_flag(cells["retired"], "Retd.", tag),
            "in_std_comp_iod": parse_flag(cells["in_std_comp_iod"], "In Std. Comp. IOD", tag),
        }
        for col in COLUMNS:
            value = cells[col] or None
            if value is not None and value not in ACTION_CODES:
                raise TableError(f"{tag}: unknown action code {value!r} in {col}")
            entry[col] = value
        if entry["basic"] is None:
            raise TableError(f"{tag}: empty Basic Profile action")
        attributes.append(entry)
    if not attributes:
        raise TableError("table has no attribute rows")
    attributes.sort(key=lambda e: e["tag"])
    return attributes, skipped


def render(edition: str, attributes: list[dict], skipped: list[str],
           extra_notes: list[str] | None = None) -> str:
    notes = [
        f"Generated by tools/gen_e1_1.py from DICOM PS3.15 {edition}, Table E.1-1 "
        f"({TABLE_TITLE}); do not edit by hand, regenerate instead.",
        "Attributes are sorted by tag. Option columns hold the action code of that "
        "option, null where the standard's cell is empty.",
        "Repeating-group tags use X for each wildcard digit (e.g. 50XXXXXX, 60XX4000); "
        "their keyword is empty.",
        "Name cells keep the standard's wording; trailing '(see Note N)' references "
        "are removed.",
    ]
    for s in skipped:
        notes.append("Left out because it is not a single attribute: " + s
                     + " (the standard's generic row for all private attributes).")
    notes.extend(extra_notes or [])
    header = {
        "source": f"DICOM PS3.15 {edition} Table E.1-1 {TABLE_TITLE}",
        "edition": edition,
        "columns": COLUMNS,
        "notes": notes,
    }
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append('  "attributes": [')
    body = [
        "    " + json.dumps(a, ensure_ascii=False, separators=(", ", ": "))
        for a in attributes
    ]
    lines.append(",\n".join(body))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def sanity_report(attributes: list[dict]) -> list[str]:
    """Dictionary check: every non-repeating tag should be known to pydicom."""
    out = []
    unknown = [a for a in attributes if "X" not in a["tag"] and not dictionary_has_tag(int(a["tag"], 16))]
    out.append(f"rows: {len(attributes)}")
    out.append(f"repeating-group rows: {sum('X' in a['tag'] for a in attributes)}")
    out.append(f"tags unknown to pydicom: {len(unknown)}")
    for a in unknown:
        out.append(f"  {a['tag']} {a['name']}")
    return out


def _is_docbook(path: Path) -> bool:
    """True for the DocBook source (root <book> in the DocBook namespace)."""
    head = path.read_bytes()[:20000]
    return re.search(rb"<book\b[^>]*http://docbook\.org/ns/docbook", head) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="part15.xml, chapter_E.html or part15.html")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--edition", help="edition label if the input does not state it, e.g. 2024c")
    ap.add_argument("--check", action="store_true", help="print a sanity report to stderr")
    ap.add_argument("--note", action="append", default=[], help="extra line for the output's notes (repeatable)")
    args = ap.parse_args(argv)

    reader = read_docbook if _is_docbook(args.source) else read_html
    try:
        edition, head, body = reader(args.source)
        edition = args.edition or edition
        if not edition:
            raise TableError("edition not found in the input; pass --edition")
        attributes, skipped = convert(head, body)
    except (TableError, ET.ParseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(edition, attributes, skipped, args.note), encoding="utf-8")
    print(f"wrote {len(attributes)} attributes (PS3.15 {edition}) to {args.output}", file=sys.stderr)
    if args.check:
        for line in sanity_report(attributes):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
