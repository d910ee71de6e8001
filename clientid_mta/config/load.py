"""Read the TOML file and turn it into a ``Config``, or stop with one ``ConfigError``.

Every key has a default, so the server runs with no file at all. A mistake stops the
start with one sentence that names the key and says how to fix it. Relative paths (and
the defaults that are paths) resolve against the config file's folder, or the current
folder when no file is given. The keys and their checks come from ``schema.py``; this
module adds what spans more than one key: the named sub-tables ([clientid.types."X"],
[dkim."example.org"]) and the rules that tie keys of a section together.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clientid_mta.config.checks import Invalid
from clientid_mta.config.model import (
    DEFAULT_TYPE_FLAGS,
    TYPE_FLAGS,
    AuthConfig,
    Config,
    DkimKey,
    ListenConfig,
    RelayConfig,
    TLSConfig,
)
from clientid_mta.config.schema import Key, Section, sections_of


class ConfigError(Exception):
    """A configuration mistake; str() is one sentence naming the key and the fix."""


def load_config(path: str | Path | None = None) -> Config:
    """Read the TOML file at ``path`` (or use the built-in defaults when None)."""
    if path is None:
        return build_config({}, Path.cwd())
    source = Path(path).expanduser().absolute()
    return build_config(read_toml(source), source.parent, source)


def read_toml(source: Path) -> dict[str, Any]:
    try:
        with open(source, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config error: the config file {source} does not exist.") from None
    except OSError as error:
        raise ConfigError(f"config error: cannot read {source}: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config error: {source} is not valid TOML: {error}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {source} is not UTF-8 text; save it as UTF-8.") from None
    except RecursionError:
        raise ConfigError(f"config error: {source} nests tables or lists too deeply.") from None


def build_config(
    document: dict[str, Any], folder: Path, source: Path | None = None, model: type = Config
) -> Config:
    """The ``model`` (a Config) that a parsed TOML ``document`` describes.

    First every plain key of every section is checked ([server] first: the other
    sections' default paths are inside its data_dir), then, section by section in file
    order, the named sub-tables and the rules between keys; so the first mistake is
    reported whatever else is wrong.
    """
    sections = sections_of(model)
    for name in sorted(set(document) - set(sections)):
        raise ConfigError(
            f"config error: unknown section [{name}]{_closest(name, list(sections))}; "
            f"known sections are: {', '.join(f'[{s}]' for s in sections)}."
        )
    server = _plain_keys(sections["server"], document.get("server", {}), folder, folder)
    data_dir: Path = server["data_dir"]
    values = {
        name: server
        if name == "server"
        else _plain_keys(section, document.get(name, {}), folder, data_dir)
        for name, section in sections.items()
    }
    built: dict[str, Any] = {}
    for name, section in sections.items():
        raw = document.get(name, {})
        if section.only_named_tables:
            built[name] = _NAMED_TABLES[name](raw, folder)
            continue
        for table in section.sub_tables:
            values[name].update(_SUB_TABLES[f"{name}.{table}"](raw.get(table, {})))
        built[name] = section.model(**values[name])
        _RULES.get(name, _no_rule)(built[name])
    config = model(**built, source=source)
    assert isinstance(config, Config)
    return config


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{match[0]}"?)' if match else ""


def _plain_keys(section: Section, raw: Any, folder: Path, data_dir: Path) -> dict[str, Any]:
    """The checked value, or the default, of every plain key of a section."""
    name = section.name
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: [{name}] must be a table, not a single value.")
    if not section.only_named_tables:
        for key in sorted(set(raw) - set(section.keys) - set(section.sub_tables)):
            raise ConfigError(
                f'config error: [{name}] has an unknown key "{key}"'
                f"{_closest(key, list(section.keys))}; "
                f"known keys are: {', '.join(section.keys)}."
            )
    return {
        key.name: _value(name, key, raw[key.name], folder)
        if key.name in raw
        else key.default(folder, data_dir)
        for key in section.keys.values()
    }


def _value(section: str, key: Key, value: Any, folder: Path) -> Any:
    if key.check is None:
        return _path(section, key.name, value, folder)
    try:
        return key.check(value)
    except Invalid as bad:
        raise ConfigError(f"config error: [{section}] {key.name} {bad}.") from None


def _path(section: str, key: str, value: Any, folder: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config error: [{section}] {key} must be a file path string.")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user for a user that does not exist
        raise ConfigError(
            f"config error: [{section}] {key}: {value!r} names a home folder that "
            "does not exist; write the full path."
        ) from None
    return path if path.is_absolute() else folder / path


# --- named sub-tables ------------------------------------------------------------


def _type_flags(raw: Any) -> dict[str, Any]:
    """[clientid.types."<name or glob>"] tables; "default" covers unknown types."""
    if not isinstance(raw, dict):
        raise ConfigError(
            'config error: [clientid.types] must hold tables like [clientid.types."UUID"].'
        )
    entries: list[tuple[str, frozenset[str]]] = []
    default = frozenset(DEFAULT_TYPE_FLAGS)
    for pattern, table in raw.items():
        where = f'[clientid.types."{pattern}"]'
        if not isinstance(table, dict) or set(table) - {"flags"}:
            raise ConfigError(f"config error: {where} takes one key, flags = [...].")
        flags = table.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ConfigError(f"config error: {where} flags must be a list of strings.")
        unknown = [f for f in flags if f not in TYPE_FLAGS]
        if unknown:
            raise ConfigError(
                f'config error: {where} flags has unknown flag "{unknown[0]}"; '
                f"known flags are: {', '.join(TYPE_FLAGS)}."
            )
        if pattern.lower() == "default":
            default = frozenset(flags)
        else:
            entries.append((pattern, frozenset(flags)))
    return {"types": tuple(entries), "default_flags": default}


def _dkim_keys(raw: Any, folder: Path) -> tuple[DkimKey, ...]:
    """[dkim."<domain>"] tables: selector = "...", key = "path/to/private.pem"."""
    if not isinstance(raw, dict):
        raise ConfigError('config error: [dkim] must hold tables like [dkim."example.org"].')
    keys = []
    for domain, table in raw.items():
        where = f'[dkim."{domain}"]'
        if not isinstance(table, dict) or set(table) != {"selector", "key"}:
            raise ConfigError(
                f'config error: {where} needs exactly two keys, selector = "..." and '
                'key = "path to the private key" (make one with: clientid-mta dkim keygen).'
            )
        selector, key = table["selector"], table["key"]
        if not isinstance(selector, str) or not selector or not isinstance(key, str) or not key:
            raise ConfigError(f"config error: {where} selector and key must be non-empty strings.")
        path = Path(key).expanduser()
        keys.append(
            DkimKey(domain.lower(), selector, path if path.is_absolute() else folder / path)
        )
    return tuple(keys)


# "section.field" -> the parser of that field's named tables: it returns field values.
_SUB_TABLES: dict[str, Callable[[Any], dict[str, Any]]] = {"clientid.types": _type_flags}
# A section made only of named tables -> its parser.
_NAMED_TABLES: dict[str, Callable[[Any, Path], Any]] = {"dkim": _dkim_keys}


# --- rules between the keys of a section ------------------------------------------


def _tls_pair(tls: TLSConfig) -> None:
    if (tls.certificate is None) != (tls.key is None):
        missing = "key" if tls.key is None else "certificate"
        raise ConfigError(
            f"config error: [tls] {missing} is missing; set both certificate and key, "
            "or neither to use a generated self-signed certificate."
        )


def _relay_needs(relay: RelayConfig) -> None:
    if relay.username and relay.password_file is None:
        raise ConfigError(
            "config error: [relay] username is set but password_file is not; put the "
            "smarthost password in a file readable only by the server and name it there."
        )
    if relay.client_id and not relay.smarthost:
        raise ConfigError(
            "config error: [relay] client_id needs a smarthost; set smarthost, or remove client_id."
        )


def _auth_backend(auth: AuthConfig) -> None:
    if auth.backend == "dovecot" and not auth.dovecot_socket:
        raise ConfigError(
            'config error: [auth] backend = "dovecot" needs dovecot_socket; set it to '
            'Dovecot\'s auth-client socket, e.g. "/run/dovecot/auth-client" or '
            '"tcp:127.0.0.1:12345".'
        )


def _proxy_sources(listen: ListenConfig) -> None:
    if not (listen.submission_proxy_protocol or listen.submissions_proxy_protocol):
        return
    if not listen.proxy_from:
        raise ConfigError(
            "config error: [listen] proxy_from is empty, so every connection to a PROXY"
            " protocol listener would be refused; list your proxies' addresses."
        )
    for network in listen.proxy_from:
        if network.endswith("/0"):
            raise ConfigError(
                f"config error: [listen] proxy_from holds {network}: anyone could send a"
                " PROXY header and choose the client address that budgets, caps, the audit"
                " and fail2ban see; list your proxies' addresses only."
            )


def _no_rule(_section: Any) -> None:
    pass


_RULES: dict[str, Callable[[Any], None]] = {
    "tls": _tls_pair,
    "relay": _relay_needs,
    "auth": _auth_backend,
    "listen": _proxy_sources,
}
