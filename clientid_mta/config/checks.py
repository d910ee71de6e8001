"""Value checks for config keys: each turns a raw TOML value into the value a field holds.

A check raises ``Invalid`` with the end of a sentence that starts with the key, so the
loader can say ``[limits] max_errors must be a positive whole number.``. Checks know
nothing about sections, files or defaults; a field names its check in its metadata
(``clientid_mta.config.model.setting``) or gets the one for its type (``for_type``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

Check = Callable[[Any], Any]


class Invalid(Exception):
    """A value a key cannot take; str() completes "[section] key ...", e.g. "must be a string"."""


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("must be a string")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def positive(value: Any) -> int:
    if not _whole_number(value) or value <= 0:
        raise Invalid("must be a positive whole number")
    return int(value)


def count(value: Any) -> int:
    if not _whole_number(value) or value < 0:
        raise Invalid("must be a whole number, 0 or more")
    return int(value)


def port(value: Any) -> int:
    if not _whole_number(value) or not 0 < value < 65536:
        raise Invalid("must be a port number from 1 to 65535")
    return int(value)


def one_of(*choices: str) -> Check:
    """A check that accepts exactly these strings."""

    def check(value: Any) -> str:
        text = string(value)
        if text not in choices:
            raise Invalid("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return text

    return check


def host_port(value: Any) -> str:
    """ "host:port" (``[::1]:587`` for IPv6 literals), or "" for none."""
    text = string(value)
    if text == "":
        return text
    host, colon, port_text = text.rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Invalid(f'must be "host:port", e.g. "smtp.provider.example:587", not {text!r}')
    return text


def host_ports(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid('must be a list like ["127.0.0.1:53"]')
    return tuple(host_port(v) for v in value if v)


def retry_schedule(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid("must be a non-empty list of seconds, e.g. [60, 300, 900, 3600, 7200]")
    return tuple(positive(v) for v in value)


def address_or_empty(value: Any) -> str:
    text = string(value).strip().lower()
    if text and (text.count("@") != 1 or " " in text):
        raise Invalid('must be an e-mail address such as "postmaster@example.org", or ""')
    return text


def localpart(value: Any) -> str:
    text = string(value).strip().lower()
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise Invalid('must be a local part such as "device-approval"')
    return text


_HOSTNAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def hostname(value: Any) -> str:
    text = string(value).strip().rstrip(".")
    if not text or not set(text) <= _HOSTNAME_CHARACTERS or ".." in text:
        raise Invalid('must be a DNS host name such as "mail.example.org"')
    return text


def domains(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid('must be a list of domain names such as ["example.org"]')
    return tuple(hostname(v).lower() for v in value)


def networks(value: Any) -> tuple[str, ...]:
    """A list of networks such as ["127.0.0.1/32", "10.0.0.0/8"] (a bare address: /32, /128)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid('must be a list of networks such as ["127.0.0.1/32", "::1/128"]')
    try:
        return tuple(str(ipaddress.ip_network(v.strip(), strict=False)) for v in value)
    except ValueError as error:
        raise Invalid(f'must be a list of networks such as ["10.0.0.0/8"] ({error})') from None


SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _systemd_endpoint(text: str) -> str:
    """``systemd:domain=INET:index=0`` or ``...:name=NAME``, checked without the sockets:
    the admin command reads the same config outside systemd, where there are none."""
    arguments = dict(part.partition("=")[::2] for part in text.split(":")[1:])
    usage = (
        'is not a systemd socket description; write "systemd:domain=INET:index=0" or '
        '"systemd:domain=INET6:name=submission" (the FileDescriptorName of the .socket unit)'
    )
    known_keys = set(arguments) <= {"domain", "index", "name"}
    one_way = ("index" in arguments) != ("name" in arguments)  # by position or by name
    values = arguments.get("index", "0").isdigit() and arguments.get("name", "-") != ""
    if not (known_keys and one_way and values and arguments.get("domain") in SYSTEMD_DOMAINS):
        raise Invalid(usage)
    return text


def endpoint(value: Any) -> str:
    """A Twisted server endpoint description, or "" (that listener is off).

    Parsed against a MemoryReactor: parsing only builds an endpoint object, and importing
    the global reactor here would install the default one before the program can choose.
    """
    text = string(value)
    if text == "":
        return text
    if text.startswith("systemd:"):
        return _systemd_endpoint(text)
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as error:  # strports raises many kinds; all mean "bad description"
        raise Invalid(
            f'is not a Twisted endpoint description ({error}); write e.g. "tcp:587" '
            'or "tcp:587:interface=127.0.0.1", or "" to turn it off'
        ) from None
    return text


def database_url(value: Any) -> str:
    """A libpq connection URI or key/value string for PostgreSQL, or "" for SQLite. The
    password is never in it (a config file is often readable by more than the server)."""
    text = string(value)
    if text == "":
        return text
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    scheme = text.partition("://")[0] if "://" in text else ""
    if scheme and scheme not in ("postgresql", "postgres"):
        raise Invalid(
            f'must be a PostgreSQL URL like "postgresql://clientid@db.example:5432/clientid",'
            f" not a {scheme}:// URL"
        )
    try:
        parts = conninfo_to_dict(text)
    except ProgrammingError:
        raise Invalid(
            'is not a PostgreSQL connection URL; write e.g. "postgresql://clientid@db.example'
            ':5432/clientid" or "host=db.example dbname=clientid user=clientid"'
        ) from None
    if "password" in parts:
        raise Invalid(
            "must not hold the password: put it in [store] password_file (or libpq's"
            " PGPASSFILE) and remove it from the URL"
        )
    return text


def socket_address(value: Any) -> str:
    """A unix socket path (``/run/dovecot/lmtp`` or ``unix:/run/dovecot/lmtp``) or
    ``tcp:host:port``, as ``unix:<path>`` or ``tcp:host:port``; "" for none."""
    text = string(value).strip()
    if text == "":
        return text
    if text.startswith("tcp:"):
        host_port(text[4:])
        return text
    path = text[5:] if text.startswith("unix:") else text
    if not path.startswith("/"):
        raise Invalid(
            f'must be an absolute socket path such as "/run/dovecot/lmtp" or '
            f'"tcp:host:port", not {text!r}'
        )
    return "unix:" + path


_BY_TYPE: dict[Any, Check] = {bool: boolean, str: string, int: positive}


def for_type(annotation: Any) -> Check | None:
    """The check a field of this type gets when its metadata names none (ints: positive)."""
    return _BY_TYPE.get(annotation)
