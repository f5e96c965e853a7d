"""Keyed, deterministic replacements: UIDs and pseudonyms derived with HMAC-SHA256.

The same (scope, original) always gives the same output under one key, so re-sent instances,
priors and references stay consistent; without the key nothing can be reversed or predicted.
``scope`` separates partners: two hospitals that happen to use the same identifier never share a
pseudonym or a UID.
"""

from __future__ import annotations

import hashlib
import hmac


class KeyedHash:
    """Domain-separated HMAC-SHA256 under the service key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonymization key must be at least 16 bytes")
        self._key = key

    def digest(self, domain: str, *parts: str) -> bytes:
        msg = domain.encode() + b"\x00" + b"\x00".join(p.encode("utf-8", "surrogateescape") for p in parts)
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def uid(self, scope: str, original: str) -> str:
        """A ``2.25.`` UID (PS3.5 B.2) from the first 128 bits of the HMAC: at most 44 characters."""
        return "2.25." + str(int.from_bytes(self.digest("uid", scope, original.strip("\x00 "))[:16], "big"))

    def pseudonym(self, domain: str, scope: str, original: str, *, prefix: str, length: int = 12) -> str:
        """Upper-case hex pseudonym, e.g. ``P-3F9A0C11D2E4``; 48 bits at the default length."""
        return prefix + self.digest(domain, scope, original).hex()[:length].upper()
