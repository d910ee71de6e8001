"""Issue 6, point 3: the TLS policy on both listeners (STARTTLS and implicit TLS).

TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE with AES-GCM or ChaCha20-Poly1305; the whole
chain in ``[tls] certificate`` is served; a key that group or others may read stops the
start with one sentence naming it; SIGHUP reloads certificate and key without dropping
sessions, and a broken new pair leaves the old one in use; Debian's testssl.sh rates no
protocol or cipher weak.

No docs/conformance.md row covers TLS policy (S1 only names the two ports), so the tests are named
``I6_3`` after the issue point.

Clients: ``openssl s_client`` for what the local OpenSSL can still offer, and a hand-built
TLS 1.2 ClientHello for the suites Debian's OpenSSL no longer has at all (3DES, RC4, DES,
EXPORT): only raw bytes can show the server refuses those. The test certificate is RSA so
that RSA key exchange and ECDHE-RSA suites are possible at all; with an EC certificate they
would be refused whatever the policy, and the refusals would prove nothing.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clientid_mta.config import ConfigError, load_config
from clientid_mta.server.service import build_components
from tests.conftest import HOSTNAME, RunningServer, Wire, merge_toml, start_server
from tests.serverproc import run_twistd_once, running
from tests.typed_reactor import blockingCallFromThread, reactor

PEM = serialization.Encoding.PEM
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: reload\r\n\r\nHi.\r\n"
ALERT_HANDSHAKE_FAILURE = "SSL alert number 40"  # what s_client prints for the server's alert
ALERT_PROTOCOL_VERSION = "SSL alert number 70"
LOOSE = "@SECLEVEL=0"  # let the local client offer what it still can, however weak
PORTS = pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")  # Debian names it "testssl"


# --- a root CA, an intermediate and leaves, written the way operators install them ------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(
    subject: str,
    public_key: Any,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    path_length: int | None = None,
) -> x509.Certificate:
    """A certificate for ``subject``: a CA unless ``path_length`` is None (then a server leaf).

    ``issuer`` None makes it self-signed. Extensions are those strict verifiers require.
    """
    now = datetime.datetime.now(datetime.UTC)
    leaf = path_length is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=not leaf, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=leaf,
                content_commitment=False,
                key_encipherment=leaf,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=not leaf,
                crl_sign=not leaf,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    if leaf:
        names = [x509.DNSName(HOSTNAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def install(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with ``data`` at exactly ``mode`` (as certbot & co. do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = path.with_name(path.name + ".new")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(new, mode)
    os.replace(new, path)


def rsa_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Leaf:
    """An installed server certificate: fullchain file, key file, and the leaf's DER."""

    certificate: Path
    key: Path
    der: bytes

    @property
    def toml(self) -> str:
        return f'[tls]\ncertificate = "{self.certificate}"\nkey = "{self.key}"\n'


@dataclass(frozen=True)
class Authority:
    """A root CA (the only thing clients trust) and an intermediate that signs leaves."""

    root: Path
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, directory: Path) -> Authority:
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _sign("Test Root CA", root_key.public_key(), None, root_key, path_length=1)
        middle_key = ec.generate_private_key(ec.SECP256R1())
        middle = _sign("Test Issuing CA", middle_key.public_key(), root, root_key, path_length=0)
        install(directory / "root.pem", root.public_bytes(PEM), 0o644)
        return cls(directory / "root.pem", middle, middle_key)

    def issue(self, directory: Path, key_mode: int = 0o600, chain: bool = True) -> Leaf:
        """A new RSA leaf installed as ``directory``/fullchain.pem (leaf + intermediate)."""
        key_pem = rsa_key_pem()
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = _sign(HOSTNAME, key.public_key(), self.intermediate, self.intermediate_key)
        fullchain = leaf.public_bytes(PEM)
        if chain:
            fullchain += self.intermediate.public_bytes(PEM)
        certificate, key_path = directory / "fullchain.pem", directory / "key.pem"
        install(key_path, key_pem, key_mode)
        install(certificate, fullchain, 0o644)
        return Leaf(certificate, key_path, leaf.public_bytes(serialization.Encoding.DER))


def client_context(root: Path) -> ssl.SSLContext:
    """A verifying client that trusts ``root`` alone (so the server must send the intermediate)."""
    return ssl.create_default_context(cafile=str(root))


def trusting(server: RunningServer, root: Path) -> RunningServer:
    """Make the harness clients (``smtp()``, ``wire()``) trust ``root`` instead of the
    server's generated self-signed certificate."""
    server.ssl_context = lambda: client_context(root)  # type: ignore[method-assign]
    return server


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def chain_server(
    authority: Authority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One server for the read-only probes: RSA leaf + intermediate, key mode 0600."""
    root = tmp_path_factory.mktemp("chain")
    leaf = authority.issue(root / "tls")
    server = trusting(start_server(root / "server", leaf.toml), authority.root)
    yield server
    server.stop()


# --- clients -------------------------------------------------------------------------------


def s_client(server: RunningServer, implicit: bool, *options: str) -> tuple[int, str]:
    """``openssl s_client`` to one port (STARTTLS done by s_client): (exit status, output)."""
    port = server.tls_port if implicit else server.port
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *options]
    if not implicit:
        argv += ["-starttls", "smtp"]
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False
    )
    return done.returncode, done.stdout + done.stderr


def brief_handshake(
    server: RunningServer, implicit: bool, root: Path, *options: str
) -> tuple[int, str]:
    """A verifying s_client handshake (``-brief`` output) with extra ``options``."""
    return s_client(
        server, implicit, "-brief", "-CAfile", str(root), "-verify_return_error", *options
    )


def assert_refused_by_server(status: int, output: str, alert: str) -> None:
    """The handshake failed because the SERVER sent ``alert`` (not a local client refusal)."""
    assert status != 0, output
    assert alert in output, output
    assert "CONNECTION ESTABLISHED" not in output, output


def _vector(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def _uint16s(values: Sequence[int]) -> bytes:
    return b"".join(value.to_bytes(2, "big") for value in values)


def client_hello(suites: Sequence[int]) -> bytes:
    """A TLS 1.2 ClientHello record offering exactly ``suites`` (with the usual extensions)."""
    groups = (0x001D, 0x0017, 0x0018)  # x25519, secp256r1, secp384r1
    schemes = (0x0804, 0x0805, 0x0401, 0x0501, 0x0403, 0x0201, 0x0203)
    extensions = b"".join(
        kind.to_bytes(2, "big") + _vector(2, body)
        for kind, body in (
            (0x000A, _vector(2, _uint16s(groups))),  # supported_groups
            (0x000B, _vector(1, b"\x00")),  # ec_point_formats: uncompressed
            (0x000D, _vector(2, _uint16s(schemes))),  # signature_algorithms
        )
    )
    body = b"\x03\x03" + os.urandom(32) + _vector(1, b"")
    body += _vector(2, _uint16s(suites)) + _vector(1, b"\x00") + _vector(2, extensions)
    handshake = b"\x01" + _vector(3, body)
    return b"\x16\x03\x01" + _vector(2, handshake)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def raw_handshake(server: RunningServer, implicit: bool, suites: Sequence[int]) -> str:
    """Offer ``suites`` in a hand-made ClientHello; the server's first answer, as
    ``"alert <description>"`` or ``"server_hello <chosen suite>"``."""
    if implicit:
        sock = socket.create_connection(("127.0.0.1", server.tls_port), timeout=10)
    else:
        wire = Wire(server)
        assert wire.code("EHLO client.example.net") == 250
        assert wire.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
        sock = wire.sock
    with sock:
        sock.sendall(client_hello(suites))
        header = _read_exact(sock, 5)
        fragment = _read_exact(sock, int.from_bytes(header[3:5], "big"))
    if header[0] == 0x15:  # alert: level, description
        return f"alert {fragment[1]}"
    assert header[0] == 0x16 and fragment[0] == 0x02, (header, fragment[:8])  # ServerHello
    session_id_length = fragment[38]
    chosen = fragment[39 + session_id_length : 41 + session_id_length]
    return f"server_hello {int.from_bytes(chosen, 'big'):#06x}"


def served_certificate(server: RunningServer, implicit: bool) -> bytes:
    """The DER leaf a new session gets (verified against the trusted root on the way)."""
    wire = server.wire(implicit=implicit)
    try:
        if not implicit:
            wire.tls_session(ehlo=False)
        assert isinstance(wire.sock, ssl.SSLSocket)
        der = wire.sock.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        wire.close()


def served_everywhere(server: RunningServer) -> set[bytes]:
    return {served_certificate(server, implicit) for implicit in (False, True)}


def authenticated_session(server: RunningServer, implicit: bool) -> Wire:
    wire = server.wire(implicit=implicit)
    if implicit:
        assert wire.code("EHLO client.example.net") == 250
    else:
        wire.tls_session()
    assert wire.auth_plain("alice@example.org", "alice-password") == 235
    return wire


def submit_on(wire: Wire) -> None:
    """MAIL, RCPT, DATA on an open session, each with its exact success reply."""
    assert wire.cmd("MAIL FROM:<alice@example.org>") == (250, ["2.1.0 Ok"])
    assert wire.cmd("RCPT TO:<bob@example.org>") == (250, ["2.1.5 Ok"])
    assert wire.code("DATA") == 354
    code, [text] = wire.cmd(MESSAGE + b".")
    assert (code, text[:20]) == (250, "2.0.0 Ok: queued as "), text


# --- protocols ------------------------------------------------------------------------------


@PORTS
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_I6_3_tls_1_0_and_1_1_are_refused_with_protocol_version_alert(
    chain_server: RunningServer, authority: Authority, implicit: bool, version: str
) -> None:
    status, output = brief_handshake(
        chain_server, implicit, authority.root, version, "-cipher", f"DEFAULT:{LOOSE}"
    )
    assert_refused_by_server(status, output, ALERT_PROTOCOL_VERSION)


@PORTS
@pytest.mark.parametrize(
    ("version", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")], ids=["1.2", "1.3"]
)
def test_I6_3_tls_1_2_and_1_3_work(
    chain_server: RunningServer, authority: Authority, implicit: bool, version: str, name: str
) -> None:
    """The control for the refusals above: the same client, same options, newer version."""
    status, output = brief_handshake(
        chain_server, implicit, authority.root, version, "-cipher", f"DEFAULT:{LOOSE}"
    )
    assert status == 0, output
    assert f"Protocol version: {name}\n" in output, output
    assert "Verification: OK" in output, output


# --- ciphers --------------------------------------------------------------------------------

# What the local OpenSSL can offer, by OpenSSL cipher string (TLS 1.2 only).
WEAK_OFFERABLE = {
    "cbc": "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-RSA-AES256-SHA384",
    "rsa_key_exchange": "kRSA",
    "dhe_not_ecdhe": "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384",
    "null": "eNULL",
    "anonymous": "aNULL",
}

# What it cannot offer any more, by IANA number, for the hand-made ClientHello.
WEAK_RAW = {
    "3des": (0x000A, 0xC012, 0xC008, 0x0016),
    "rc4": (0x0005, 0x0004, 0xC011, 0xC007),
    "single_des": (0x0009, 0x0015),
    "export": (0x0003, 0x0006, 0x0008, 0x0014),
    "null": (0x0001, 0x0002, 0x003B, 0xC010),
    "cbc": (0xC013, 0xC014, 0xC027, 0xC028),
    "rsa_key_exchange": (0x009C, 0x009D, 0x002F, 0x0035),
}


@PORTS
@pytest.mark.parametrize("suites", WEAK_OFFERABLE.values(), ids=WEAK_OFFERABLE.keys())
def test_I6_3_client_offering_only_weak_suites_is_refused(
    chain_server: RunningServer, authority: Authority, implicit: bool, suites: str
) -> None:
    status, output = brief_handshake(
        chain_server, implicit, authority.root, "-tls1_2", "-cipher", f"{suites}:{LOOSE}"
    )
    assert_refused_by_server(status, output, ALERT_HANDSHAKE_FAILURE)


@PORTS
@pytest.mark.parametrize(
    "suite",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_I6_3_client_offering_ecdhe_aead_works(
    chain_server: RunningServer, authority: Authority, implicit: bool, suite: str
) -> None:
    """The control for the refusals: same client, same options, a good suite."""
    status, output = brief_handshake(
        chain_server, implicit, authority.root, "-tls1_2", "-cipher", f"{suite}:{LOOSE}"
    )
    assert status == 0, output
    assert f"Ciphersuite: {suite}\n" in output, output


@PORTS
@pytest.mark.parametrize("suites", WEAK_RAW.values(), ids=WEAK_RAW.keys())
def test_I6_3_raw_hello_with_only_weak_suites_gets_handshake_failure(
    chain_server: RunningServer, implicit: bool, suites: tuple[int, ...]
) -> None:
    assert raw_handshake(chain_server, implicit, suites) == "alert 40"


@PORTS
@pytest.mark.parametrize(
    "suite", [0xC02F, 0xC030, 0xCCA8], ids=["aes128gcm", "aes256gcm", "chacha"]
)
def test_I6_3_raw_hello_with_ecdhe_aead_gets_server_hello(
    chain_server: RunningServer, implicit: bool, suite: int
) -> None:
    """The control for the raw refusals: the same hand-made hello with one good suite."""
    weak = WEAK_RAW["3des"] + WEAK_RAW["rc4"]
    assert raw_handshake(chain_server, implicit, (*weak, suite)) == f"server_hello {suite:#06x}"


# --- the chain ------------------------------------------------------------------------------


@PORTS
def test_I6_3_whole_chain_is_served_and_verifies_against_the_root_alone(
    chain_server: RunningServer, authority: Authority, implicit: bool
) -> None:
    client = chain_server.smtp(implicit=implicit)  # verifies with only the root trusted
    assert client.noop() == (250, b"2.0.0 Ok")
    client.close()

    verify = ("-CAfile", str(authority.root), "-verify_return_error")
    status, output = s_client(chain_server, implicit, "-showcerts", *verify)
    assert status == 0, output
    assert output.count("-----BEGIN CERTIFICATE-----") == 2, output
    assert " 0 s:CN = mail.example.org" in output and " 1 s:CN = Test Issuing CA" in output
    assert "Verify return code: 0 (ok)" in output, output


@PORTS
def test_I6_3_leaf_without_intermediate_does_not_verify_control(
    make_server: Callable[..., RunningServer],
    authority: Authority,
    tmp_path: Path,
    implicit: bool,
) -> None:
    """Shows the test above needs the served intermediate: without it the client fails."""
    leaf = authority.issue(tmp_path / "tls", chain=False)
    server = trusting(make_server(leaf.toml), authority.root)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        server.smtp(implicit=implicit)


# --- key permissions --------------------------------------------------------------------


def write_config(root: Path, leaf: Leaf) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "clientid-mta.toml"
    config.write_text(merge_toml(leaf.toml))
    return config


def assert_one_sentence_naming(message: str, key: Path, mode: int) -> None:
    assert "\n" not in message, message
    assert f"[tls] key {key} can be read by group or others (mode {mode:04o})" in message
    assert ". " not in message.replace(str(key), "KEY"), message  # one sentence


@pytest.mark.parametrize("mode", [0o640, 0o604], ids=oct)
def test_I6_3_key_readable_by_group_or_others_refuses_start_in_process(
    make_server: Callable[..., RunningServer], authority: Authority, tmp_path: Path, mode: int
) -> None:
    leaf = authority.issue(tmp_path / "tls", key_mode=mode)
    config_path = write_config(tmp_path / "server", leaf)
    with pytest.raises(ConfigError) as built:
        build_components(load_config(config_path))
    assert_one_sentence_naming(str(built.value), leaf.key, mode)
    with pytest.raises(ConfigError) as started:
        make_server(leaf.toml)  # (stopped by the fixture if it does start)
    assert str(started.value) == str(built.value)

    os.chmod(leaf.key, 0o600)  # control: the same files, made private, are accepted
    build_components(load_config(config_path)).store.close()


@pytest.mark.parametrize("mode", [0o640, 0o604], ids=oct)
def test_I6_3_key_readable_by_group_or_others_stops_twistd_with_one_line(
    authority: Authority, tmp_path: Path, mode: int
) -> None:
    leaf = authority.issue(tmp_path / "tls", key_mode=mode)
    status, output = run_twistd_once(tmp_path, write_config(tmp_path, leaf))
    assert status != 0, output
    assert "Traceback" not in output
    [line] = output.strip().splitlines()
    assert line.startswith("clientid-mta: config error: "), line
    assert_one_sentence_naming(line, leaf.key, mode)


def test_I6_3_certificate_and_key_that_do_not_match_refuse_start(
    make_server: Callable[..., RunningServer], authority: Authority, tmp_path: Path
) -> None:
    """Otherwise the server would start and fail every handshake on both ports."""
    leaf = authority.issue(tmp_path / "tls")
    install(leaf.key, rsa_key_pem())  # a private key, mode 0600, of some other certificate
    with pytest.raises(ConfigError) as refused:
        make_server(leaf.toml)
    assert str(refused.value).startswith("config error: [tls] certificate and key do not go")


# --- reload ------------------------------------------------------------------------------


def _garbage_key(leaf: Leaf) -> None:
    install(leaf.key, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")


def _key_of_another_certificate(leaf: Leaf) -> None:
    install(leaf.key, rsa_key_pem())


def _garbage_certificate(leaf: Leaf) -> None:
    install(leaf.certificate, b"not a certificate\n", 0o644)


def _key_readable_by_others(leaf: Leaf) -> None:
    os.chmod(leaf.key, 0o644)


BROKEN: dict[str, Callable[[Leaf], None]] = {
    "garbage_key": _garbage_key,
    "key_of_another_certificate": _key_of_another_certificate,
    "garbage_certificate": _garbage_certificate,
    "key_readable_by_others": _key_readable_by_others,
}


def reload_in_process(server: RunningServer) -> bool:
    return bool(blockingCallFromThread(reactor, server.service.reload))


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
def test_I6_3_reload_in_process_swaps_a_good_pair_and_keeps_it_over_a_broken_one(
    make_server: Callable[..., RunningServer],
    authority: Authority,
    tmp_path: Path,
    breakage: Callable[[Leaf], None],
) -> None:
    first = authority.issue(tmp_path / "tls")
    server = trusting(make_server(first.toml), authority.root)
    server.add_user("alice@example.org", "alice-password")
    server.add_user("bob@example.org", "bob-password")
    session = authenticated_session(server, implicit=False)
    assert served_everywhere(server) == {first.der}

    second = authority.issue(tmp_path / "tls")
    assert reload_in_process(server) is True
    assert served_everywhere(server) == {second.der}

    breakage(authority.issue(tmp_path / "tls"))  # a third pair, broken, in place of the second
    assert reload_in_process(server) is False
    assert served_everywhere(server) == {second.der}

    submit_on(session)  # the session from before both reloads still works
    assert len(server.messages("bob@example.org")) == 1


def test_I6_3_sighup_reloads_certificate_and_key_without_dropping_sessions(
    authority: Authority, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    first = authority.issue(tls_dir)
    with running(tmp_path / "server", first.toml) as proc:
        trusting(proc, authority.root)
        assert proc.process is not None
        sessions = [authenticated_session(proc, implicit) for implicit in (False, True)]
        assert served_everywhere(proc) == {first.der}

        second = authority.issue(tls_dir)
        os.kill(proc.process.pid, signal.SIGHUP)
        proc.wait_for_output(r"reloaded the TLS certificate and key", timeout=15)
        for session in sessions:
            submit_on(session)
        assert served_everywhere(proc) == {second.der}

        _garbage_key(second)
        os.kill(proc.process.pid, signal.SIGHUP)
        failed = proc.wait_for_output(r"reload failed, keeping the old certificate: (.*)", 15)
        assert str(second.key) in failed.group(1)
        assert served_everywhere(proc) == {second.der}
        for session in sessions:
            assert session.cmd("NOOP") == (250, ["2.0.0 Ok"])
            assert session.cmd("QUIT")[0] == 221
        assert proc.process.poll() is None
        assert "Traceback" not in proc.output()
        assert len(proc.messages("bob@example.org")) == 2


# --- testssl.sh ------------------------------------------------------------------------------

PROTOCOL_IDS = {"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"}
CIPHER_PREFIXES = ("cipherlist_", "cipher-", "cipher_", "PFS", "DH_groups")
WEAK_SEVERITIES = {"MEDIUM", "HIGH", "CRITICAL"}
EXPECTED_SUITES = {
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
}
TESTSSL_TIMEOUT = 300


def start_testssl(target: list[str], jsonfile: Path) -> subprocess.Popen[bytes]:
    """testssl.sh, protocols (-p), cipher categories (-s), forward secrecy (-f) and the
    suites per protocol (-E), writing flat JSON."""
    argv = [str(TESTSSL), "--quiet", "--color", "0", "--warnings", "off", "-p", "-s", "-f", "-E"]
    argv += ["--jsonfile", str(jsonfile), *target]
    with open(jsonfile.with_suffix(".out"), "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def policy_findings(jsonfile: Path) -> dict[str, dict[str, str]]:
    """The protocol and cipher findings, by id."""
    findings = json.loads(jsonfile.read_text())
    return {
        finding["id"]: finding
        for finding in findings
        if finding["id"] in PROTOCOL_IDS or finding["id"].startswith(CIPHER_PREFIXES)
    }


@pytest.mark.skipif(TESTSSL is None, reason="testssl.sh is not installed (Debian: testssl.sh)")
@pytest.mark.timeout(TESTSSL_TIMEOUT + 60)
def test_I6_3_testssl_rates_no_protocol_or_cipher_weak_on_either_port(
    chain_server: RunningServer, tmp_path: Path
) -> None:
    targets = {
        "starttls": ["--starttls", "smtp", f"127.0.0.1:{chain_server.port}"],
        "implicit_tls": [f"127.0.0.1:{chain_server.tls_port}"],
    }
    runs = {
        name: start_testssl(target, tmp_path / f"{name}.json") for name, target in targets.items()
    }  # both at once: the implicit-TLS run spends most of its time probing for HTTP
    for name, run in runs.items():
        status = run.wait(timeout=TESTSSL_TIMEOUT)
        transcript = (tmp_path / f"{name}.out").read_text(errors="replace")
        assert status == 0, transcript
        findings = policy_findings(tmp_path / f"{name}.json")
        summary = (f"{f['id']} {f['severity']}: {f['finding']}" for f in findings.values())
        print(f"testssl.sh {name}:", *summary, sep="\n  ")  # shown with -s, or on failure
        weak = [f for f in findings.values() if f["severity"] in WEAK_SEVERITIES]
        assert weak == [], transcript
        verdicts = {key: findings[key]["finding"] for key in PROTOCOL_IDS}
        assert verdicts == {
            "SSLv2": "not offered",
            "SSLv3": "not offered",
            "TLS1": "not offered",
            "TLS1_1": "not offered",
            "TLS1_2": "offered",
            "TLS1_3": "offered with final",
        }, transcript
        assert findings["cipherlist_STRONG"]["finding"] == "offered"
        suites = {f["finding"].split()[3] for k, f in findings.items() if k.startswith("cipher-")}
        assert suites == EXPECTED_SUITES, transcript
