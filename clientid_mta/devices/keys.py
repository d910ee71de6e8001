"""The server's device-token key: the HMAC key behind every stored device key.

Created once (mode 0600, never overwritten) and read at start. Losing it makes every
known device unknown, so it is backed up with the device store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def load_or_create_server_key(path: Path) -> bytes:
    """Read the HMAC key, creating it (mode 0600, never overwritten) on first start."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(
            f"{path} does not hold a hex key of at least 16 bytes; "
            "move it aside and restart to generate a new one (known devices will need re-approval)"
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """A short keyed digest that tells two keys apart without revealing either: what a
    shared store records so that a node with another key refuses to start."""
    return hmac.new(key, b"clientid-mta device-token key", hashlib.sha256).hexdigest()[:16]
