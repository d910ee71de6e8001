"""Issue 4 item 6: DKIM signing per sending domain, and ``clientid-mta dkim keygen``.

The check the issue names: a signed message verifies with dkimpy against the printed TXT
record. The record is read back with dnspython's zone-file parser, as a DNS server would,
and the message is verified in the CRLF form a client sends on the wire.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from clientid_mta.config import DkimKey, load_config
from clientid_mta.outbound.dkim import ALGORITHMS, DkimKeyError, DkimSigner, keygen, keygen_command

DOMAIN = "example.org"
SELECTOR = "s1"

# The stored (LF) form of a message as a mail client writes it: encoded-word display name
# and subject, folded fields, unsigned trace and X- fields, 8-bit UTF-8 body text, a
# dot-stuffed line, trailing whitespace and trailing blank lines.
MESSAGE = (
    "Received: from [192.0.2.7] (client.example.net [192.0.2.7])\n"
    "\tby mail.example.org with ESMTPSA; Tue, 03 Mar 2026 10:00:01 +0100\n"
    "From: =?UTF-8?Q?Al=C3=AFce_Li=C3=B0ell?= <alice@example.org>\n"
    "To: Bob <bob@example.net>\n"
    "Cc: carol@example.net\n"
    "Subject: =?UTF-8?B?UmU6IGNhZsOpIG1lbnUg4oCUIMO8YmVyIGRpZSBHcsO2w59l?=\n"
    "Date: Tue, 03 Mar 2026 10:00:00 +0100\n"
    "Message-ID: <4f1c2e0a-77b3-4c1e-9d1e-1d2c3b4a5f6e@example.org>\n"
    "References: <first@example.net>\n"
    " <second@example.net>\n"
    "User-Agent: Mozilla Thunderbird\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8;\n"
    " format=flowed\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Hello Bob,   \n"
    "\n"
    "the café menu is attached\t \n"
    "..a line that started with a dot\n"
    "\n"
    "-- \n"
    "Alïce\n"
    "\n"
    "\n"
).encode()

# h= for MESSAGE: the listed fields present, in order, and From once more.
SIGNED = [
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "from",
]
ALGORITHM_TAG = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
KEY_TAG = {"rsa": b"rsa", "ed25519": b"ed25519"}


@dataclass(frozen=True)
class Keyed:
    algorithm: str
    path: Path
    txt: str
    signer: DkimSigner


@pytest.fixture(scope="module", params=ALGORITHMS)
def keyed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Keyed:
    algorithm: str = request.param
    path, txt = keygen(DOMAIN, SELECTOR, tmp_path_factory.mktemp(algorithm), algorithm)
    return Keyed(algorithm, path, txt, DkimSigner([DkimKey(DOMAIN, SELECTOR, path)]))


def wire(message: bytes) -> bytes:
    """What a client sends for a stored LF message (dot-stuffing aside)."""
    return message.replace(b"\n", b"\r\n")


def published(txt: str) -> tuple[str, bytes]:
    """The owner name and the joined value of a TXT record line, read as a zone file."""
    assert "\n" not in txt
    zone = dns.zone.from_text(
        f"$TTL 3600\n{txt}\n", origin=dns.name.root, relativize=False, check_origin=False
    )
    [(name, node)] = zone.nodes.items()
    rdataset = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
    assert rdataset is not None
    [rdata] = rdataset
    assert all(len(part) <= 255 for part in rdata.strings)
    return name.to_text(), b"".join(rdata.strings)


def resolver(txt: str) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc that knows only the record ``txt``."""
    owner, value = published(txt)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return value if name.decode() == owner else None

    return lookup


def tags(header: bytes) -> dict[bytes, bytes]:
    name, _, value = header.partition(b":")
    assert name == b"DKIM-Signature"
    return dkim.util.parse_tag_value(re.sub(rb"\r\n[ \t]", b" ", value))


def sign(keyed: Keyed, message: bytes = MESSAGE) -> bytes:
    header = keyed.signer.signature_header(message, DOMAIN)
    assert header is not None
    return header


def verifies(keyed: Keyed, signed: bytes) -> bool:
    return bool(dkim.verify(signed, dnsfunc=resolver(keyed.txt)))


def test_I4_6_signed_message_verifies_against_the_printed_txt_record(keyed: Keyed) -> None:
    header = sign(keyed)
    assert header.startswith(b"DKIM-Signature: ")
    assert header.endswith(b"\r\n")
    assert header.count(b"\n") == header.count(b"\r\n") > 1  # folded, CRLF only
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    assert verifies(keyed, header + wire(MESSAGE))


def test_I4_6_crlf_input_is_signed_as_the_same_wire_form(keyed: Keyed) -> None:
    assert verifies(keyed, sign(keyed, wire(MESSAGE)) + wire(MESSAGE))


def test_I4_6_signature_is_relaxed_relaxed_over_the_listed_fields_without_l(
    keyed: Keyed,
) -> None:
    sig = tags(sign(keyed))
    assert sig[b"a"] == ALGORITHM_TAG[keyed.algorithm]
    assert sig[b"c"] == b"relaxed/relaxed"
    assert (sig[b"d"], sig[b"s"]) == (DOMAIN.encode(), SELECTOR.encode())
    assert b"l" not in sig
    assert [name.strip().decode() for name in sig[b"h"].split(b":")] == SIGNED


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("the café menu".encode(), b"the cafe menu"),
        (b"Hello Bob,", b"Hello Rob,"),
        (b"-- \r\n", b"P.S. pay here\r\n-- \r\n"),
        (b"Cc: carol@example.net", b"Cc: mallory@example.net"),
        (b"Date: Tue, 03", b"Date: Wed, 04"),
        (b"Content-Transfer-Encoding: 8bit\r\n", b""),
        (b"From: =?UTF-8", b"From: Mallory <mallory@example.org>\r\nFrom: =?UTF-8"),
    ],
    ids=["body-8bit", "body-text", "body-added", "cc", "date", "field-removed", "from-added"],
)
def test_I4_6_changed_body_or_signed_field_fails_verification(
    keyed: Keyed, old: bytes, new: bytes
) -> None:
    header, message = sign(keyed), wire(MESSAGE)
    assert message.count(old) == 1
    assert not verifies(keyed, header + message.replace(old, new))


def test_I4_6_relaxed_canonicalization_survives_whitespace_and_unsigned_fields(
    keyed: Keyed,
) -> None:
    header, message = sign(keyed), wire(MESSAGE)
    for old, new in [
        (b"Subject: ", b"Subject:   "),
        (b"To: Bob", b"TO:\tBob"),
        (b"\r\n <second@", b" <second@"),  # unfolded
        (b"Hello Bob,   \r\n", b"Hello Bob,\r\n"),
        (b"attached\t \r\n", b"attached \r\n"),
        ("Alïce\r\n\r\n\r\n".encode(), "Alïce\r\n".encode()),  # trailing blank lines
    ]:
        assert message.count(old) == 1
        message = message.replace(old, new)
    relayed = b"Received: by mx.example.net; Tue, 03 Mar 2026 10:00:02 +0100\r\n" + header
    assert verifies(keyed, relayed + message)


def public_bytes(path: Path) -> bytes:
    """The public key of the PEM private key at ``path``, as DKIM publishes it."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_I4_6_txt_record_publishes_the_written_key(keyed: Keyed) -> None:
    owner, value = published(keyed.txt)
    assert owner == f"{SELECTOR}._domainkey.{DOMAIN}."
    assert re.fullmatch(rf'{re.escape(owner)} IN TXT \( ("[^"]{{1,255}}" )+\)', keyed.txt)
    record = dkim.util.parse_tag_value(value)
    assert (record[b"v"], record[b"k"]) == (b"DKIM1", KEY_TAG[keyed.algorithm])
    assert base64.b64decode(record[b"p"], validate=True) == public_bytes(keyed.path)
    _, bits, ktag, _ = dkim.evaluate_pk(owner.encode(), value)
    assert ktag == KEY_TAG[keyed.algorithm]
    assert bits == (2048 if keyed.algorithm == "rsa" else 256)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_I4_6_keygen_writes_a_pkcs8_key_with_mode_0600(
    tmp_path: Path, umask: int, algorithm: str
) -> None:
    previous = os.umask(umask)
    try:
        path, _ = keygen(DOMAIN, SELECTOR, tmp_path / "dkim", algorithm)
    finally:
        os.umask(previous)
    assert path == tmp_path / "dkim" / f"{DOMAIN}.{SELECTOR}.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_I4_6_keygen_refuses_to_overwrite_a_key(tmp_path: Path, algorithm: str) -> None:
    path, _ = keygen(DOMAIN, SELECTOR, tmp_path, "ed25519")
    before = path.read_bytes()
    with pytest.raises(DkimKeyError, match=re.escape(str(path))):
        keygen(DOMAIN, SELECTOR, tmp_path, algorithm)
    assert path.read_bytes() == before
    assert path.stat().st_mode & 0o777 == 0o600


def pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def good_key(path: Path, mode: int) -> None:
    written, _ = keygen(DOMAIN, "other", path.parent, "ed25519")
    written.rename(path)
    path.chmod(mode)


def small_rsa_key(path: Path) -> None:
    subprocess.run(["openssl", "genrsa", "-out", str(path), "512"], check=True, capture_output=True)
    path.chmod(0o600)


def key_file(data: Callable[[], bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data())
        path.chmod(0o600)

    return write


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda path: good_key(path, 0o644), "can be read by group or others (mode 0644)"),
        (lambda path: good_key(path, 0o640), "chmod 600"),
        (lambda path: good_key(path, 0o602), "mode 0602"),
        (lambda path: None, "cannot be read (No such file or directory)"),
        (lambda path: path.mkdir(mode=0o700), "is not a file"),
        (key_file(lambda: b"this is not a key\n"), "is not an unencrypted PEM private key"),
        (key_file(lambda: b""), "is not an unencrypted PEM private key"),
        (
            key_file(lambda: pem(ec.generate_private_key(ec.SECP256R1()), b"passphrase")),
            "is not an unencrypted PEM private key",
        ),
        (
            key_file(
                lambda: (
                    ed25519.Ed25519PrivateKey.generate()
                    .public_key()
                    .public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                )
            ),
            "is not an unencrypted PEM private key",
        ),
        (
            key_file(lambda: pem(ec.generate_private_key(ec.SECP256R1()))),
            "RSA or Ed25519 keys only",
        ),
        (small_rsa_key, "is a 512-bit RSA key"),
    ],
    ids=[
        "world-readable",
        "group-readable",
        "world-writable",
        "missing",
        "directory",
        "garbage",
        "empty",
        "encrypted",
        "public-key",
        "ec-key",
        "rsa-512",
    ],
)
def test_I4_6_unusable_key_file_is_refused_naming_the_key(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    path = tmp_path / "bad.key"
    make(path)
    good, _ = keygen("example.net", SELECTOR, tmp_path, "ed25519")
    keys = [DkimKey("example.net", SELECTOR, good), DkimKey(DOMAIN, SELECTOR, path)]
    with pytest.raises(DkimKeyError) as refused:
        DkimSigner(keys)
    message = str(refused.value)
    assert message.startswith(f'[dkim."{DOMAIN}"] key {path} ')
    assert says in message
    assert "\n" not in message and message.endswith((".", f"chmod 600 {path}"))


@pytest.mark.parametrize(
    ("sender_domain", "signed"),
    [
        (DOMAIN, True),
        (DOMAIN.upper(), True),
        (f"{DOMAIN}.", True),
        ("example.net", False),
        (f"mail.{DOMAIN}", False),
        ("org", False),
        ("", False),
    ],
)
def test_I4_6_only_mail_from_a_domain_with_a_key_is_signed(
    keyed: Keyed, sender_domain: str, signed: bool
) -> None:
    header = keyed.signer.signature_header(MESSAGE, sender_domain)
    assert (header is not None) == signed
    if header is not None:
        assert tags(header)[b"d"] == DOMAIN.encode()
        assert verifies(keyed, header + wire(MESSAGE))


def test_I4_6_internationalised_domain_signs_with_its_a_label(tmp_path: Path) -> None:
    path, txt = keygen("b\u00fccher.example", SELECTOR, tmp_path, "ed25519")
    assert path.name == f"xn--bcher-kva.example.{SELECTOR}.key"
    assert published(txt)[0] == f"{SELECTOR}._domainkey.xn--bcher-kva.example."
    signer = DkimSigner([DkimKey("b\u00fccher.example", SELECTOR, path)])
    for domain in ("B\u00dcCHER.example", "xn--bcher-kva.example"):
        header = signer.signature_header(MESSAGE, domain)
        assert header is not None
        assert dkim.verify(header + wire(MESSAGE), dnsfunc=resolver(txt))


@pytest.mark.parametrize(
    "message",
    [b"", b"To: bob@example.net\nSubject: no sender\n\nhello\n", b" folded first\n\nbody\n"],
    ids=["empty", "no-from", "starts-folded"],
)
def test_I4_6_message_without_a_from_field_is_not_signed(keyed: Keyed, message: bytes) -> None:
    assert keyed.signer.signature_header(message, DOMAIN) is None


def run_keygen(
    capsys: pytest.CaptureFixture[str], data_dir: Path, *argv: str
) -> tuple[int, list[str], list[str]]:
    status = keygen_command(list(argv), data_dir)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_I4_6_keygen_command_prints_txt_line_and_config_that_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    status, out, err = run_keygen(
        capsys, tmp_path / "data", DOMAIN, "--selector", "2026a", "--algorithm", algorithm
    )
    assert (status, err) == (0, [])
    [txt] = [line for line in out if line.startswith("2026a._domainkey.example.org. IN TXT (")]
    snippet = "\n".join(out[out.index(txt) + 1 :])
    config_file = tmp_path / "clientid-mta.toml"
    config_file.write_text(snippet + "\n")
    assert tomllib.loads(snippet)["dkim"][DOMAIN]["selector"] == "2026a"
    config = load_config(config_file)
    key = config.dkim_key(DOMAIN)
    assert key is not None
    assert key.key == tmp_path / "data" / "dkim" / f"{DOMAIN}.2026a.key"
    header = DkimSigner(config.dkim).signature_header(MESSAGE, DOMAIN)
    assert header is not None
    assert dkim.verify(header + wire(MESSAGE), dnsfunc=resolver(txt))


def test_I4_6_keygen_command_default_selector_is_year_and_month(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    months = {datetime.date.today().strftime("%Y%m")}
    status, out, _ = run_keygen(capsys, tmp_path, DOMAIN, "--algorithm", "ed25519")
    months.add(datetime.date.today().strftime("%Y%m"))
    assert status == 0
    [written] = (tmp_path / "dkim").iterdir()
    assert written.name in {f"{DOMAIN}.{month}.key" for month in months}
    assert f'selector = "{written.name.split(".")[-2]}"' in out


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    path, _ = keygen(DOMAIN, SELECTOR, tmp_path / "keys", "ed25519")
    return path


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "the following arguments are required: DOMAIN"),
        ([DOMAIN, "--algorithm", "dsa"], "invalid choice: 'dsa'"),
        (["not a domain"], "is not a domain name"),
        (["localhost"], "is not a domain name"),
        ([DOMAIN, "--selector", "s_1"], "is not a valid DKIM selector"),
        ([DOMAIN, "--selector", SELECTOR], "already exists and is not replaced"),
        ([DOMAIN, "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_I4_6_keygen_command_refusal_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], existing: Path, argv: list[str], says: str
) -> None:
    before = sorted(existing.parent.iterdir())
    status, out, err = run_keygen(capsys, existing.parent, *argv, "--dir", str(existing.parent))
    assert (status, out) == (2, [])
    [line] = err
    assert line.startswith("clientid-mta dkim keygen: ")
    assert says in line
    assert sorted(existing.parent.iterdir()) == before


def test_I4_6_openssl_rsa_signature_is_byte_identical_to_dkimpys_own(tmp_path: Path) -> None:
    """The RSA step is OpenSSL's instead of dkimpy's pure Python: same bytes, as
    RSASSA-PKCS1-v1_5 is deterministic."""
    import hashlib

    import dkim.crypto

    from clientid_mta.outbound.dkim import _openssl_rsa_sign

    path, _txt = keygen("example.org", "s1", tmp_path)
    pkcs1 = serialization.load_pem_private_key(path.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    key = dkim.crypto.parse_pem_private_key(pkcs1)
    for data in (b"", b"one", b"x" * 10000):
        digest = hashlib.sha256(data)
        assert _openssl_rsa_sign(digest, key) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, key)
