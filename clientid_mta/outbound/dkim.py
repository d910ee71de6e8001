"""DKIM signing of outgoing mail, per sending domain, and ``clientid-mta dkim keygen``.

Keys are PEM files named in ``[dkim."<domain>"]`` tables. An RSA key signs with
rsa-sha256, an Ed25519 key with ed25519-sha256 (RFC 8463); both relaxed/relaxed, without
an l= tag. The signing itself is dkimpy's: RSA keys are handed to it as PKCS#1 PEM and
Ed25519 keys as the base64 of their 32-byte seed, which is what it expects.

dkimpy computes RSA signatures in pure Python (about 11 ms for a 2048-bit key, measured
by bench/relay_throughput.py, holding the GIL all along). ``_openssl_rsa_sign`` takes its
place: the same RSASSA-PKCS1-v1_5 signature, which is deterministic and so the same
bytes, computed by OpenSSL through ``cryptography`` in well under a millisecond.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import json
import os
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from twisted.logger import Logger

from clientid_mta.config import DkimKey

log = Logger()

#: Header fields signed when present, each as many times as it occurs. From is signed
#: once more than it occurs (dkimpy's default), so a second From cannot be added.
SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "in-reply-to",
    "references",
)
ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
MIN_RSA_BITS = 1024  # RFC 8301: verifiers must not accept shorter keys
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_CANARY = b"From: dkim@invalid\r\nSubject: key check\r\n\r\nkey check\r\n"


_RSA_FIELDS = (
    "prime1",
    "prime2",
    "privateExponent",
    "exponent1",
    "exponent2",
    "coefficient",
    "publicExponent",
    "modulus",
)
_DIGESTS = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303 - verifying old keys


@functools.lru_cache(maxsize=64)
def _openssl_key(p: int, q: int, d: int, dp: int, dq: int, qi: int, e: int, n: int) -> Any:
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def _openssl_rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, key)``, done by OpenSSL."""
    key = _openssl_key(*(private_key[field] for field in _RSA_FIELDS))
    signature: bytes = key.sign(
        digest.digest(), padding.PKCS1v15(), utils.Prehashed(_DIGESTS[digest.name])
    )
    return signature


dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign


class DkimKeyError(ValueError):
    """A DKIM key that cannot be used or written; the message names the file and the fix."""


@dataclass(frozen=True)
class _SigningKey:
    domain: bytes  # d=, ASCII (A-labels)
    selector: bytes
    algorithm: bytes  # a=
    private: bytes  # what dkimpy's sign() takes for that algorithm


def _domain_name(domain: str) -> str:
    """The lower-case ASCII (A-label) form of ``domain``, or ``domain`` lower-cased if invalid."""
    name = domain.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return name


def _is_dns_name(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


class DkimSigner:
    """Signs messages for the domains it holds keys for; thread-safe (no shared state)."""

    def __init__(self, keys: Iterable[DkimKey]) -> None:
        self._keys = {_domain_name(key.domain): _load_key(key) for key in keys}

    @property
    def domains(self) -> frozenset[str]:
        """The (A-label) domains this signer holds a key for."""
        return frozenset(self._keys)

    def signature_header(self, message: bytes, sender_domain: str) -> bytes | None:
        """The ``DKIM-Signature:`` field (folded, CRLF-terminated) to put above ``message``.

        None when there is no key for ``sender_domain``, or when the message has no From
        field or a header section dkimpy cannot parse (logged; the message goes unsigned).
        ``message`` may use LF or CRLF line ends: the signature covers its CRLF form.
        """
        key = self._keys.get(_domain_name(sender_domain))
        if key is None:
            return None
        try:
            return _sign(message, key)
        except (dkim.DKIMException, IndexError, ValueError) as problem:
            log.warn(
                "DKIM: not signing a message from {domain}: {problem}",
                domain=sender_domain,
                problem=problem,
            )
            return None


def _sign(message: bytes, key: _SigningKey) -> bytes:
    signer = dkim.DKIM(message, signature_algorithm=key.algorithm, linesep=b"\r\n")
    present = [name.lower() for name, _ in signer.headers]
    if b"from" not in present:
        raise dkim.MessageFormatError("it has no From header field")
    wanted = {name.encode("ascii") for name in SIGNED_HEADERS}
    include = [name for name in present if name in wanted] + [b"from"]
    header: bytes = signer.sign(
        key.selector,
        key.domain,
        key.private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
        length=False,
    )
    return header


def _load_key(key: DkimKey) -> _SigningKey:
    """Read, check and convert one configured key; DkimKeyError naming it otherwise."""
    where = f'[dkim."{key.domain}"] key {key.key}'
    fix = f"make one with: clientid-mta dkim keygen {key.domain}"
    try:
        status = key.key.stat()
        if not stat.S_ISREG(status.st_mode):
            raise DkimKeyError(f"{where} is not a file; point it at a PEM private key, or {fix}.")
        if status.st_mode & 0o077:
            raise DkimKeyError(
                f"{where} can be read by group or others (mode {status.st_mode & 0o777:04o}); "
                f"make it private with: chmod 600 {key.key}"
            )
        data = key.key.read_bytes()
    except OSError as problem:
        raise DkimKeyError(
            f"{where} cannot be read ({problem.strerror}); point it at the private key, or {fix}."
        ) from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimKeyError(
            f"{where} is not an unencrypted PEM private key; point it at one, or {fix}."
        ) from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"{where} is a {private.key_size}-bit RSA key, which receivers refuse "
                f"(at least {MIN_RSA_BITS}, better {RSA_BITS}); {fix}."
            )
        algorithm = b"rsa-sha256"
        material = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = b"ed25519-sha256"
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        material = base64.b64encode(seed)
    else:
        raise DkimKeyError(
            f"{where} is a {type(private).__name__.removeprefix('_')} key, but DKIM signs with "
            f"RSA or Ed25519 keys only; {fix}."
        )
    loaded = _SigningKey(
        _domain_name(key.domain).encode("ascii", "replace"),
        key.selector.encode("ascii", "replace"),
        algorithm,
        material,
    )
    try:
        _sign(_CANARY, loaded)
    except dkim.DKIMException as problem:
        raise DkimKeyError(f"{where} cannot sign ({problem}); {fix}.") from None
    return loaded


def txt_record(
    domain: str, selector: str, public_key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
) -> str:
    """The zone-file line publishing ``public_key``, its value in <=255-octet strings."""
    if isinstance(public_key, rsa.RSAPublicKey):
        kind = "rsa"
        raw = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        kind = "ed25519"  # RFC 8463: p= is the raw 32-byte public key
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    value = f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"
    strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{_domain_name(domain)}. IN TXT ( {strings} )"


def keygen(domain: str, selector: str, directory: Path, algorithm: str = "rsa") -> tuple[Path, str]:
    """Write a new private key to ``directory/<domain>.<selector>.key`` (PKCS#8 PEM, 0600).

    Returns the path and the DNS TXT record line to publish. An existing file is never
    replaced: DkimKeyError.
    """
    name = _domain_name(domain)
    if not _is_dns_name(name) or "." not in name:
        raise DkimKeyError(
            f"{domain!r} is not a domain name; give the mail domain, e.g. example.org."
        )
    if not _is_dns_name(selector):
        raise DkimKeyError(
            f"{selector!r} is not a valid DKIM selector; use letters, digits and hyphens, "
            "e.g. 202601."
        )
    if algorithm not in ALGORITHMS:
        raise DkimKeyError(f"unknown key algorithm {algorithm!r}; use rsa or ed25519.")
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        if algorithm == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / f"{name}.{selector}.key"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimKeyError(
            f"{path} already exists and is not replaced; choose another selector "
            "(--selector), or remove the file once no DNS record uses it."
        ) from None
    except OSError as problem:
        raise DkimKeyError(
            f"cannot write {path} ({problem.strerror}); choose another directory with --dir."
        ) from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(pem)
    return path, txt_record(name, selector, private.public_key())


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def keygen_command(argv: list[str], data_dir: Path) -> int:
    """``clientid-mta dkim keygen DOMAIN [--selector S] [--algorithm A] [--dir D]``.

    ``argv`` is what follows ``keygen``. Prints the DNS record and the config snippet;
    returns 0, or 2 after one line on standard error.
    """
    parser = _Parser(
        prog="clientid-mta dkim keygen",
        description="Make a DKIM key for a domain; print its DNS record and config lines.",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="the mail domain, e.g. example.org")
    parser.add_argument(
        "--selector",
        default=datetime.date.today().strftime("%Y%m"),
        help="the DKIM selector (default: this year and month, e.g. 202601)",
    )
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="rsa")
    parser.add_argument("--dir", type=Path, help="where to write the key (default: DATA_DIR/dkim)")
    try:
        args = parser.parse_args(argv)
        path, txt = keygen(
            args.domain, args.selector, args.dir or data_dir / "dkim", args.algorithm
        )
    except (_UsageError, DkimKeyError) as problem:
        print(f"clientid-mta dkim keygen: {problem}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    domain = _domain_name(args.domain)
    print(f"; publish this record in the DNS zone of {domain}:")
    print(txt)
    print()
    print(
        f"# add this to the clientid-mta config file (private key: {path.absolute()}, mode 0600):"
    )
    print(f"[dkim.{_toml_string(domain)}]")
    print(f"selector = {_toml_string(args.selector)}")
    print(f"key = {_toml_string(str(path.absolute()))}")
    return 0
