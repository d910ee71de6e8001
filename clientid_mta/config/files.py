"""Start-time checks that the files an operator named in the config exist."""

from __future__ import annotations

from clientid_mta.config.load import ConfigError, read_toml
from clientid_mta.config.model import Config


def check_server_files(config: Config) -> None:
    """Files the server needs that an operator named must exist (defaults are created)."""
    named = [
        ("tls", "certificate", config.tls.certificate),
        ("tls", "key", config.tls.key),
        ("travel", "geoip_database", config.travel.geoip_database),
        ("relay", "password_file", config.relay.password_file),
        ("relay", "ca_file", config.relay.ca_file),
        ("store", "password_file", config.store.password_file),
        ("auth", "send_as_file", config.auth.send_as_file),
        *(("dkim", f'"{k.domain}" key', k.key) for k in config.dkim),
    ]
    if config.source is not None:
        # Only a passwd_file named in the file must exist; the default one is created.
        raw_auth = read_toml(config.source).get("auth", {})
        if "passwd_file" in raw_auth:
            named.append(("auth", "passwd_file", config.auth.passwd_file))
    for section, key, path in named:
        if path is not None and not path.is_file():
            hints = {
                "passwd_file": f" create it with: clientid-mta --config {config.source} user add"
                " ADDRESS",
                "geoip_database": " point it at a MaxMind .mmdb file, or remove the key",
                "password_file": " point it at the file that holds the password",
                "send_as_file": " create it (address:alias,alias a line), or remove the key",
            }
            hint = hints.get(key, " point it at an existing PEM file")
            raise ConfigError(f"config error: [{section}] {key}: {path} does not exist;{hint}.")
