"""Cleaning free text for the Clean Descriptors, Clean Structured Content and Clean Graphics
options (PS3.15 E.3.5, E.3.9, E.3.8): a safe vocabulary is kept, everything else is removed.

Any word of a free-text value may be a name, an identifier or a date, and no list of names can be
complete, so the rule is an allow-list: a word survives only if it is in the vocabulary
(``imaging/data/safe_words.txt`` plus an operator's file) or is a short number with an optional
unit ("5", "2.5mm", "120kv"). Dates written in any style ("13.06.1987", "1987-06-13",
"19870613") are not short numbers and are removed. Runs of CJK ideographs, which have no spaces,
are segmented greedily into the longest vocabulary terms; ideographs that match no term go.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

_WORD = re.compile(r"[^\W_]+(?:[/'\-.,][^\W_]+)*|[+%°]", re.UNICODE)
_NUMBER = re.compile(
    r"\d{1,3}(?:[.,]\d{1,3})?(?:mm|cm|m|ml|mg|kg|kv|kvp|ma|mas|s|ms|sec|min|h|hz|khz|mhz|t|x|deg|%|°)?", re.I
)
_JOINERS = re.compile(r"[/\-]")
_WORD_NUMBER = re.compile(r"([^\W\d_]+)(\d{1,3})")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


class Vocabulary:
    def __init__(self, words: set[str]) -> None:
        self.words = {w.casefold() for w in words}
        self._cjk = {w for w in self.words if _CJK.fullmatch(w)}
        self._cjk_max = max((len(w) for w in self._cjk), default=0)

    @classmethod
    def parse(cls, text: str) -> set[str]:
        out: set[str] = set()
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            out.update(w for w in line.split() if w)
        return out

    @classmethod
    def load(cls, extra: Path | None = None) -> Vocabulary:
        words = cls.parse(resources.files("imaging").joinpath("data/safe_words.txt").read_text("utf-8"))
        if extra is not None:
            words |= cls.parse(extra.read_text("utf-8"))
        return cls(words)

    def _cjk_terms(self, run: str) -> list[str]:
        kept: list[str] = []
        i = 0
        while i < len(run):
            for n in range(min(self._cjk_max, len(run) - i), 0, -1):
                if run[i : i + n] in self._cjk:
                    kept.append(run[i : i + n])
                    i += n
                    break
            else:
                i += 1
        return kept

    def keeps(self, word: str) -> bool:
        """A word of the vocabulary; a short number with an optional unit; a vocabulary word with
        a short number stuck to it ("isovue300", "t2"); or parts joined by / or - that each pass,
        at most one of them a bare number ("ISOVUE300/100", "T1/T2"; not "13/06/87")."""
        w = word.casefold()
        if w in self.words or _NUMBER.fullmatch(w):
            return True
        parts = _JOINERS.split(w)
        if len(parts) > 1:
            numbers = sum(1 for p in parts if p.isdigit())
            return numbers <= 1 and all(p and self.keeps(p) for p in parts)
        m = _WORD_NUMBER.fullmatch(w)
        return bool(m) and m[1] in self.words

    def clean(self, text: str) -> str:
        """The words of ``text`` that are in the vocabulary, joined by single spaces."""
        kept: list[str] = []
        for m in _WORD.finditer(text):
            word = m.group(0)
            if _CJK.search(word):
                for part in re.split(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)", word):
                    if not part:
                        continue
                    if _CJK.fullmatch(part):
                        kept.extend(self._cjk_terms(part))
                    elif self.keeps(part):
                        kept.append(part)
            elif self.keeps(word):
                kept.append(word)
        return " ".join(kept)


@cache
def default_vocabulary() -> Vocabulary:
    return Vocabulary.load()
