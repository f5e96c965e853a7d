"""The identity vault: pseudonym allocation on ingest, and re-identification for the sender.

Only the sending hospital may ever link a study back to its patient. To make that possible
without keeping anything readable, the vault stores one row per original a partner sent (a
patient ID, an accession number, a study UID) in the index's ``identity`` table:

- ``lookup``: HMAC-SHA256 of the original under the service key and the partner's scope. It
  finds the row again when the same original comes back, and cannot be reversed.
- ``pseudonym``: what the de-identified data carries instead of the original. It is allocated
  once and unique per kind across all partners, so a pseudonym names exactly one original.
- ``ciphertext``: the originals (e.g. patient ID and name) as JSON, sealed with AES-256-GCM under
  the vault key, a separate 32-byte key file in the data folder (mode 0600). Each record has its
  own random 96-bit nonce, and its associated data binds (partner id, kind, pseudonym): a sealed
  record moved onto another partner's or another pseudonym's row fails to open.

Not stored anywhere, in the index or in logs: any original value in clear, and no key. Whoever
holds the database alone learns nothing; whoever also holds the vault key can open every record,
so back the key up separately from the database and guard it as the patients' identities.

Who may call ``find_studies`` and ``reveal``: the sending partner's own users and the operator's
admins, acting for that partner, and nobody else (the HTTP route that enforces this comes later).
Both take the partner id of the caller's hospital and never return another partner's study.
``pseudonym`` is for the ingest path.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imaging.pseudonym import KeyedHash
from imx.keys import load_or_create_key
from storage.index import IDENTITY_KINDS, Index, PseudonymsExhausted

CACHE_ENTRIES = 4096
MAX_CANDIDATES = 64
# the widest pseudonym each kind's column takes (Patient.pseudonym, Study.accession, study UID)
PSEUDONYM_LIMITS = {"patient": 64, "accession": 16, "study": 64}

_FORMAT = b"\x01"  # sealed record: format byte, 12-byte nonce, AES-GCM ciphertext and tag
_NONCE_BYTES = 12


class VaultError(RuntimeError):
    """The vault could not do what was asked (no free pseudonym)."""


class VaultIntegrityError(VaultError):
    """A sealed record failed authentication: nothing from it was revealed."""


def normal(original: str) -> str:
    """The form of an original the vault hashes: DICOM padding (spaces, trailing NULs) removed,
    so that ``"ACC1 "`` as sent and ``"ACC1"`` as typed into a search find the same row."""
    return original.strip(" \x00\t\r\n")


class IdentityVault:
    """Allocates pseudonyms that stay linked, under seal, to their originals.

    Thread-safe; one per process. See the module docstring for what is stored and who may call
    ``find_studies`` and ``reveal``."""

    def __init__(
        self, index: Index, keyed: KeyedHash, key_path: Path, *, cache_size: int = CACHE_ENTRIES
    ) -> None:
        self.index = index
        self.keyed = keyed
        self._aead = AESGCM(load_or_create_key(key_path))
        self._cache: OrderedDict[tuple[int, str, str], str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- sealing ----------------------------------------------------------------------------------
    @staticmethod
    def _associated(partner_id: int, kind: str, pseudonym: str) -> bytes:
        return b"\x00".join(
            [b"imx-identity-v1", str(partner_id).encode(), kind.encode(), pseudonym.encode()]
        )

    def _seal(self, partner_id: int, kind: str, pseudonym: str, originals: dict[str, str]) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        # ASCII JSON escapes every code point, lone surrogates from undecodable bytes included
        plain = json.dumps(originals, sort_keys=True).encode("ascii")
        return (
            _FORMAT
            + nonce
            + self._aead.encrypt(nonce, plain, self._associated(partner_id, kind, pseudonym))
        )

    def _open(self, partner_id: int, kind: str, pseudonym: str, sealed: bytes) -> dict[str, str]:
        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _FORMAT:
            raise VaultIntegrityError(
                f"the sealed {kind} record of pseudonym {pseudonym} is malformed; nothing was revealed"
            )
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, body, self._associated(partner_id, kind, pseudonym))
        except InvalidTag:
            raise VaultIntegrityError(
                f"the sealed {kind} record of pseudonym {pseudonym} failed authentication: it was "
                "altered, moved from another row, or sealed under another vault key; nothing was "
                "revealed. Restore the database or the vault key from backup."
            ) from None
        return json.loads(plain)

    def _lookup(self, scope: str, kind: str, original: str) -> str:
        value = normal(original)
        if not value:
            raise ValueError(f"the original {kind} is empty: give the caller's fallback instead")
        return self.keyed.digest("reid-lookup", scope, kind, value).hex()

    # -- ingest -----------------------------------------------------------------------------------
    def pseudonym(
        self,
        partner_id: int,
        scope: str,
        kind: str,
        original: str,
        originals: dict[str, str],
        candidates: Callable[[int], str],
    ) -> str:
        """The pseudonym of ``original`` (a ``kind`` of value sent by the partner), allocated and
        recorded on first sight: ``candidates(0)`` if no other original of this kind holds it,
        else ``candidates(1)``, ... up to MAX_CANDIDATES tries. ``originals`` (what ``reveal``
        will return, e.g. ``{"patient_id": ..., "patient_name": ...}``) is sealed only when the
        row is created. Repeated calls are answered from a per-process cache."""
        if kind not in IDENTITY_KINDS:
            raise ValueError(f"unknown identity kind {kind!r}: expected one of {IDENTITY_KINDS}")
        key = (partner_id, kind, self._lookup(scope, kind, original))
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        limit = PSEUDONYM_LIMITS[kind]

        def offered() -> Iterator[str]:
            for i in range(MAX_CANDIDATES):
                candidate = candidates(i)
                if not candidate or len(candidate) > limit:
                    raise ValueError(
                        f"candidate {i} for a {kind} pseudonym is empty or longer than {limit}"
                    )
                yield candidate

        try:
            chosen = self.index.claim_identity(
                partner_id,
                kind,
                key[2],
                offered(),
                lambda p: self._seal(partner_id, kind, p, originals),
            )
        except PseudonymsExhausted:
            raise VaultError(
                f"no free {kind} pseudonym among {MAX_CANDIDATES} candidates for partner {partner_id}"
            ) from None
        with self._lock:
            self._cache[key] = chosen
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return chosen

    # -- re-identification (the sending partner's users and admins only) -------------------------
    def find_studies(
        self,
        partner_id: int,
        scope: str,
        *,
        accession: str | None = None,
        patient_id: str | None = None,
    ) -> list[str]:
        """UIDs (pseudonymous, as stored) of this partner's studies whose accession number and/or
        patient ID, as the partner knows them, are the given originals. Both must match when both
        are given. Another partner's studies are never found, even for the same original."""
        if accession is None and patient_id is None:
            raise ValueError("give an accession number, a patient ID or both")
        pseudonyms: dict[str, str] = {}
        for kind, original in (("accession", accession), ("patient", patient_id)):
            if original is None:
                continue
            row = self.index.identity(partner_id, kind, self._lookup(scope, kind, original))
            if row is None:
                return []
            pseudonyms[kind] = row[0]
        return self.index.find_studies(
            partner_id, patient=pseudonyms.get("patient"), accession=pseudonyms.get("accession")
        )

    def reveal(self, partner_id: int, study_uid: str) -> dict[str, str | None] | None:
        """The originals behind one of this partner's studies: ``patient_id``, ``patient_name``,
        ``accession`` and ``study_uid`` (None where the vault holds no record, e.g. a study with
        no accession). None if the study is unknown or belongs to another partner.

        Raises VaultIntegrityError if a record fails authentication or sits on another
        partner's row; nothing is revealed then."""
        study = self.index.study_pseudonyms(study_uid)
        if study is None or study[0] != partner_id:
            return None
        _, patient, accession = study
        out: dict[str, str | None] = dict.fromkeys(
            ("patient_id", "patient_name", "accession", "study_uid")
        )
        for kind, pseudonym in (
            ("patient", patient),
            ("accession", accession),
            ("study", study_uid),
        ):
            if not pseudonym:
                continue
            row = self.index.identity_by_pseudonym(kind, pseudonym)
            if row is None:
                continue  # received before the vault recorded it
            if row[0] != partner_id:
                raise VaultIntegrityError(
                    f"the {kind} record of pseudonym {pseudonym} belongs to another partner than "
                    "the study; nothing was revealed"
                )
            out.update(self._open(partner_id, kind, pseudonym, row[1]))
        return out
