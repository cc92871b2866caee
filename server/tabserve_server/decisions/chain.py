"""The decision log's record format (version 1): canonical JSON lines, each sealed with the hash of the one before.

A record is one JSON object on one line, encoded canonically (keys sorted, no spaces, UTF-8, no NaN or
infinity), so the same content always has the same bytes. The log adds these fields to what it is given:

- `v`: format version (this file describes 1; a reader refuses versions it does not know);
- `kind`: `decision` for every record given to the log (a scoring call, built by record.py); the log's own
  records are `start` (a writer process began), `close` (it stopped cleanly), `dropped` (records of answered
  calls that could not be written: counts by reason) and `pruned` (whole files removed by retention);
- `worker`: the file set (one per worker process) the record belongs to;
- `seq`: 1, 2, 3, ... within the file set, across its numbered files;
- `prev`: `hash` of the record before in the file set (64 zeros for the first);
- `alg`: `sha256`, or `hmac-sha256` when a key file is configured;
- `hash`: SHA-256 (or HMAC-SHA-256 with the key) of the canonical encoding of every other field, hex. The line
  is exactly that encoding with `"hash"` added as its last member, so a verifier may hash the bytes as written
  (up to `,"hash"`, closed with `}`) or re-encode the parsed record without `hash`: both give the same bytes.

Fields given by the caller with these names are replaced. Without a key anyone who can write the files can
recompute every hash after an edit: the chain then detects accidents and casual edits only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ALG_HMAC",
    "ALG_SHA256",
    "FORMAT_VERSION",
    "GENESIS",
    "LOG_FIELDS",
    "ChainState",
    "canonical",
    "digest",
    "digest_bytes",
    "seal",
]

FORMAT_VERSION: Final = 1
GENESIS: Final = "0" * 64
ALG_SHA256: Final = "sha256"
ALG_HMAC: Final = "hmac-sha256"
LOG_FIELDS: Final = frozenset({"v", "kind", "worker", "seq", "prev", "alg", "hash"})


# One encoder for every record: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one encoding of a record: sorted keys, no whitespace, UTF-8; ValueError on NaN or infinity."""
    return _ENCODER.encode(obj).encode()


def digest(body: Mapping[str, Any], key: bytes | None) -> str:
    """Hex hash of a record without its `hash` field: SHA-256, or HMAC-SHA-256 with `key`."""
    return digest_bytes(canonical(body), key)


def digest_bytes(data: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainState:
    """Where a file set's chain stands: the last record's sequence number and hash (0 and GENESIS: empty)."""

    seq: int = 0
    last_hash: str = GENESIS


def seal(
    kind: str, record: Mapping[str, Any], state: ChainState, worker: str, key: bytes | None
) -> tuple[bytes, ChainState]:
    """The line (with its newline) of a record of `kind` as the next of `state`, and the state after it.

    Raises ValueError (or TypeError) when the record cannot be encoded (NaN, a non-JSON value)."""
    body: dict[str, Any] = {**record}
    body.update(
        v=FORMAT_VERSION, kind=kind, worker=worker, seq=state.seq + 1, prev=state.last_hash,
        alg=ALG_SHA256 if key is None else ALG_HMAC,
    )
    body.pop("hash", None)
    data = canonical(body)
    value = digest_bytes(data, key)
    # Encoding once: the line is the hashed bytes with `hash` as their last member.
    return data[:-1] + b',"hash":"' + value.encode() + b'"}\n', ChainState(state.seq + 1, value)
