"""TLS for both listeners: the server context, and a self-signed certificate for first start."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

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


def server_context(certificate: Path, key: Path) -> ssl.CertificateOptions:
    """TLS 1.2+ server options serving the whole chain found in ``certificate``."""
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
        return ssl.CertificateOptions(
            privateKey=private_key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as problem:
        raise ConfigError(
            f"config error: [tls] certificate and key do not go together ({problem}); "
            "check that key is the private key of certificate."
        ) from None
