"""TLS for both listeners: the policy, reloading, and a self-signed certificate for first start.

Policy: TLS 1.2 and 1.3 only; for TLS 1.2 only forward-secret AEAD suites (ECDHE with
AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are all AEAD. The whole chain in the
certificate file is served. The private key must not be readable by group or others.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from clientid_mta.config import ConfigError


def generate_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Create ``cert.pem``/``key.pem`` under ``directory`` unless they exist (key mode 0600)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS:!SHA1"


def check_key_permissions(key: Path) -> None:
    """Refuse a private key that group or others may read (one sentence naming the file)."""
    try:
        mode = key.stat().st_mode
    except OSError as problem:
        raise ConfigError(
            f"config error: [tls] key {key} cannot be read ({problem.strerror})."
        ) from None
    if mode & 0o077:
        raise ConfigError(
            f"config error: [tls] key {key} can be read by group or others (mode "
            f"{mode & 0o777:04o}); make it private with: chmod 600 {key}"
        )


def server_context(certificate: Path, key: Path) -> ssl.CertificateOptions:
    """TLS 1.2+ server options serving the whole chain found in ``certificate``."""
    check_key_permissions(key)
    try:
        chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    except (OSError, ValueError) as problem:
        raise ConfigError(
            f"config error: [tls] certificate {certificate} cannot be loaded ({problem}); "
            "it must be a PEM file, leaf certificate first."
        ) from None
    try:
        private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as problem:
        raise ConfigError(
            f"config error: [tls] key {key} cannot be loaded ({problem}); "
            "it must be an unencrypted PEM private key."
        ) from None
    try:
        options = ssl.CertificateOptions(
            privateKey=private_key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        )
        options.getContext()  # builds the context now: a key of another certificate fails here
        return options
    except Exception as problem:
        raise ConfigError(
            f"config error: [tls] certificate and key do not go together ({problem}); "
            "check that key is the private key of certificate."
        ) from None


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """The context factory both listeners share; ``reload`` swaps in new files.

    Sessions already running keep their TLS connection; new ones use the new
    certificate. A broken new certificate or key leaves the old one in use.
    """

    def __init__(self, certificate: Path, key: Path) -> None:
        self.certificate = certificate
        self.key = key
        self._options = server_context(certificate, key)

    def reload(self) -> None:
        """Read the files again (raises ConfigError, keeping the old ones, if they are bad)."""
        self._options = server_context(self.certificate, self.key)

    def getContext(self) -> Any:
        return self._options.getContext()
