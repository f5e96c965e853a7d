"""The safe vocabulary of the cleaning options (imaging/descriptors.py): what survives and what
goes. Every value here is free text a person might type into a description."""

from __future__ import annotations

import pytest

from imaging.descriptors import Vocabulary, default_vocabulary


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("CT HEAD W/O CONTRAST", "CT HEAD W/O CONTRAST"),
        ("Chest PA 2.5mm 120kV", "Chest PA 2.5mm 120kV"),
        ("ISOVUE300/100", "ISOVUE300/100"),  # a contrast agent and its dose: clinically needed
        ("T1/T2 axial", "T1/T2 axial"),
        ("CT 13.06.1987 Ivanov", "CT"),  # a date and a name in free text
        ("follow-up 13/06/87", "follow-up"),  # three numbers joined: a date, not a dose
        ("MR 1987-06-13", "MR"),
        ("T2 FLAIR axial 19870613", "T2 FLAIR axial"),
        ("Axial 5mm, Dr. Smith", "Axial 5mm"),
        ("КТ головного мозга Иванов", "КТ"),
        ("胸部平扫王小明", "胸部 平扫"),
        ("Ivanov300", ""),  # a name with a number stuck to it is still a name
        ("PHI-XYZ", ""),
    ],
)
def test_only_the_safe_vocabulary_survives(text: str, cleaned: str) -> None:
    assert default_vocabulary().clean(text) == cleaned


def test_operators_extend_the_vocabulary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "words.txt"
    extra.write_text("# site terms\nvertigo-protocol\nkashgar\n", encoding="utf-8")
    assert default_vocabulary().clean("Kashgar protocol") == "protocol"
    assert Vocabulary.load(extra).clean("Kashgar protocol") == "Kashgar protocol"
