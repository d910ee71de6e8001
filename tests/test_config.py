"""The TOML configuration: its error messages, its keys, its defaults and its README tables."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clientid_mta.config import (
    SCHEMA,
    TYPE_FLAGS,
    Config,
    ConfigError,
    LimitsConfig,
    checks,
    load_config,
)
from clientid_mta.config.load import build_config
from clientid_mta.config.model import setting, setting_of
from clientid_mta.config.schema import keys_of, sections_of

ROOT = Path(__file__).resolve().parent.parent
SECTION_LIST = (
    "[server], [listen], [tls], [auth], [clientid], [delivery], [limits], [throttle], "
    "[shared_devices], [travel], [alerts], [audit], [store], [approval], [relay], [queue], "
    "[metrics], [log], [dkim]"
)
RELAY_KEYS = (
    "smarthost, tls, username, password_file, client_id, client_id_type, ca_file, helo_name, "
    "mx_port, nameservers, max_connections, max_per_destination, connect_timeout, command_timeout"
)
ENDPOINT_HINT = 'write e.g. "tcp:587" or "tcp:587:interface=127.0.0.1", or "" to turn it off.'


def load_text(tmp_path: Path, toml: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    return load_config(path)


# --- the messages: operators and scripts read them, so each one is kept word for word ------

EXACT_MESSAGES = [
    (
        '[clientid]\npolicy = "maybe"\n',
        '[clientid] policy must be one of "off", "observe", "tofu", "allowlist".',
    ),
    (
        '[listen]\nsubmision = "tcp:587"\n',
        '[listen] has an unknown key "submision" (did you mean "submission"?); '
        "known keys are: submission, submissions, submission_proxy_protocol, "
        "submissions_proxy_protocol, proxy_from.",
    ),
    (
        "[listen]\nbogus = 1\n",
        '[listen] has an unknown key "bogus"; known keys are: submission, submissions, '
        "submission_proxy_protocol, submissions_proxy_protocol, proxy_from.",
    ),
    (
        "[relay]\nca_fil = 1\n",
        '[relay] has an unknown key "ca_fil" (did you mean "ca_file"?); '
        f"known keys are: {RELAY_KEYS}.",
    ),
    ("[nosuch]\n", f"unknown section [nosuch]; known sections are: {SECTION_LIST}."),
    (
        '[store]\nurl = "postgresql://clientid:secret@db.example/clientid"\n',
        "[store] url must not hold the password: put it in [store] password_file (or libpq's"
        " PGPASSFILE) and remove it from the URL.",
    ),
    (
        '[store]\nurl = "mysql://db.example/clientid"\n',
        '[store] url must be a PostgreSQL URL like "postgresql://clientid@db.example:5432/'
        'clientid", not a mysql:// URL.',
    ),
    (
        '[store]\nurl = "host=db.example dbname"\n',
        '[store] url is not a PostgreSQL connection URL; write e.g. "postgresql://clientid@'
        'db.example:5432/clientid" or "host=db.example dbname=clientid user=clientid".',
    ),
    (
        "[servr]\n",
        f'unknown section [servr] (did you mean "server"?); known sections are: {SECTION_LIST}.',
    ),
    ("x = 1\n", f"unknown section [x]; known sections are: {SECTION_LIST}."),
    ("alerts = 1\n", "[alerts] must be a table, not a single value."),
    ("dkim = 1\n", "[dkim] must be a table, not a single value."),
    (
        '[server]\nhostname = "a..b"\n',
        '[server] hostname must be a DNS host name such as "mail.example.org".',
    ),
    ("[server]\nhostname = 1\n", "[server] hostname must be a string."),
    ("[server]\nworkers = -1\n", "[server] workers must be a whole number, 0 or more."),
    (
        '[server]\nreceived_header_ip = "yes"\n',
        "[server] received_header_ip must be true or false.",
    ),
    ("[limits]\nmax_errors = 0\n", "[limits] max_errors must be a positive whole number."),
    ("[limits]\nmax_errors = true\n", "[limits] max_errors must be a positive whole number."),
    ("[limits]\nmax_errors = 1.5\n", "[limits] max_errors must be a positive whole number."),
    ("[auth]\ncache_ttl = -1\n", "[auth] cache_ttl must be a whole number, 0 or more."),
    ('[auth]\npasswd_file = ""\n', "[auth] passwd_file must be a file path string."),
    ("[tls]\ncertificate = 1\n", "[tls] certificate must be a file path string."),
    (
        '[auth]\npasswd_file = "~nosuchuser-cfg/x"\n',
        "[auth] passwd_file: '~nosuchuser-cfg/x' names a home folder that does not exist; "
        "write the full path.",
    ),
    (
        '[listen]\nsubmission = "nonsense:1"\n',
        "[listen] submission is not a Twisted endpoint description "
        f"(Unknown endpoint type: 'nonsense'); {ENDPOINT_HINT}",
    ),
    (
        '[listen]\nsubmissions = "tcp:x"\n',
        "[listen] submissions is not a Twisted endpoint description "
        f"(invalid literal for int() with base 10: 'x'); {ENDPOINT_HINT}",
    ),
    (
        '[delivery]\nlocal_domains = "example.org"\n',
        '[delivery] local_domains must be a list of domain names such as ["example.org"].',
    ),
    (
        '[delivery]\nlocal_domains = ["a b"]\n',
        '[delivery] local_domains must be a DNS host name such as "mail.example.org".',
    ),
    ('[throttle]\naction = "500"\n', '[throttle] action must be one of "454", "421".'),
    ('[relay]\ntls = "maybe"\n', '[relay] tls must be one of "required", "opportunistic".'),
    ("[relay]\nmx_port = 65536\n", "[relay] mx_port must be a port number from 1 to 65535."),
    (
        '[relay]\nsmarthost = "host"\n',
        '[relay] smarthost must be "host:port", e.g. "smtp.provider.example:587", not \'host\'.',
    ),
    (
        '[relay]\nnameservers = "h:53"\n',
        '[relay] nameservers must be a list like ["127.0.0.1:53"].',
    ),
    (
        '[relay]\nusername = "u"\n',
        "[relay] username is set but password_file is not; put the smarthost password in a "
        "file readable only by the server and name it there.",
    ),
    (
        '[relay]\nclient_id = "c"\n',
        "[relay] client_id needs a smarthost; set smarthost, or remove client_id.",
    ),
    (
        '[alerts]\npostmaster = "a b@c"\n',
        '[alerts] postmaster must be an e-mail address such as "postmaster@example.org", or "".',
    ),
    (
        '[approval]\nlocalpart = "a b"\n',
        '[approval] localpart must be a local part such as "device-approval".',
    ),
    (
        "[queue]\nretry_schedule = []\n",
        "[queue] retry_schedule must be a non-empty list of seconds, "
        "e.g. [60, 300, 900, 3600, 7200].",
    ),
    (
        "[queue]\nretry_schedule = [60, 0]\n",
        "[queue] retry_schedule must be a positive whole number.",
    ),
    (
        '[tls]\ncertificate = "a.pem"\n',
        "[tls] key is missing; set both certificate and key, or neither to use a generated "
        "self-signed certificate.",
    ),
    (
        '[tls]\nkey = "a.pem"\n',
        "[tls] certificate is missing; set both certificate and key, or neither to use a "
        "generated self-signed certificate.",
    ),
    ("[clientid]\ntypes = 1\n", '[clientid.types] must hold tables like [clientid.types."UUID"].'),
    (
        '[clientid.types."X"]\nflag = ["auth"]\n',
        '[clientid.types."X"] takes one key, flags = [...].',
    ),
    (
        '[clientid.types."X"]\nflags = "auth"\n',
        '[clientid.types."X"] flags must be a list of strings.',
    ),
    (
        '[clientid.types."X"]\nflags = ["loud"]\n',
        '[clientid.types."X"] flags has unknown flag "loud"; known flags are: ignore, debug, '
        "syslog, userlog, auth, alert-fail, alert-success.",
    ),
    (
        '[dkim."ex.org"]\nselector = "s"\n',
        '[dkim."ex.org"] needs exactly two keys, selector = "..." and key = "path to the '
        'private key" (make one with: clientid-mta dkim keygen).',
    ),
    (
        '[dkim."ex.org"]\nselector = ""\nkey = "k"\n',
        '[dkim."ex.org"] selector and key must be non-empty strings.',
    ),
    # Several mistakes: every plain key is checked first, then section by section the
    # named tables and the rules between keys.
    (
        "[limits]\nmax_errors = 0\nbogus = 1\n",
        '[limits] has an unknown key "bogus"; known keys are: '
        "max_message_size, max_line_length, max_recipients, command_timeout, data_timeout, "
        "max_errors, max_sessions, max_sessions_per_address, max_sessions_per_device, "
        "max_messages_per_hour, max_recipients_per_hour.",
    ),
    (
        '[tls]\ncertificate = "a.pem"\n[relay]\nmx_port = 0\n',
        "[relay] mx_port must be a port number from 1 to 65535.",
    ),
    (
        '[relay]\nusername = "u"\n[clientid.types."X"]\nflags = ["loud"]\n',
        '[clientid.types."X"] flags has unknown flag "loud"; known flags are: ignore, debug, '
        "syslog, userlog, auth, alert-fail, alert-success.",
    ),
    (
        '[dkim]\nx = 1\n[relay]\nusername = "u"\n',
        "[relay] username is set but password_file is not; put the smarthost password in a "
        "file readable only by the server and name it there.",
    ),
]


@pytest.mark.parametrize(("toml", "message"), EXACT_MESSAGES)
def test_config_error_messages_are_kept_word_for_word(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as problem:
        load_text(tmp_path, toml)
    assert str(problem.value) == "config error: " + message


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[server]\nhostnme = "x"\n', ["[server]", "hostnme", "hostname"]),
        ('[limits]\nmax_message_size = "big"\n', ["[limits]", "max_message_size", "whole number"]),
        ('[clientid]\npolicy = "maybe"\n', ["[clientid]", "policy", "tofu"]),
        ('[listen]\nsubmission = "nonsense:1"\n', ["[listen]", "submission", "endpoint"]),
        ('[tls]\ncertificate = "a.pem"\n', ["[tls]", "key"]),
        ("[nosuch]\n", ["[nosuch]"]),
        ('[clientid.types."X"]\nflags = ["loud"]\n', ['"X"', "loud"]),
        ("[server\n", ["not valid TOML"]),
    ],
)
def test_config_errors_are_one_line_naming_the_key(
    tmp_path: Path, toml: str, words: list[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as problem:
        load_config(path)
    message = str(problem.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_config_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "c.toml"
    path.write_text('[server]\ndata_dir = "state"\n[auth]\npasswd_file = "users"\n')
    config = load_config(path)
    assert config.server.data_dir == tmp_path / "etc" / "state"
    assert config.auth.passwd_file == tmp_path / "etc" / "users"
    assert config.clientid.device_store == tmp_path / "etc" / "state" / "devices.sqlite3"


def test_config_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.server.data_dir == tmp_path / "clientid-mta-data"
    assert config.listen.submission == "tcp:8587:interface=127.0.0.1"
    assert config.listen.submissions == "tcp:8465:interface=127.0.0.1"
    assert config.clientid.policy == "tofu" and config.clientid.allow_without_clientid


def test_config_paths_by_default_inside_data_dir_follow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "mail.example.org")
    config = load_text(tmp_path, '[server]\ndata_dir = "/srv/state"\n')
    state = Path("/srv/state")
    assert config.server.hostname == "mail.example.org"
    assert config.auth.passwd_file == state / "passwd"
    assert config.clientid.key_file == state / "clientid.key"
    assert config.clientid.device_store == state / "devices.sqlite3"
    assert config.delivery.maildir_root == state / "mail"
    assert config.queue_config.directory == state / "queue"
    assert config.tls.certificate is None and config.travel.geoip_database is None


def test_C16_type_flags_match_globs_and_default(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[clientid.types."TB*"]\nflags = ["auth"]\n[clientid.types."default"]\nflags = ["ignore"]\n'
    )
    settings = load_config(path).clientid
    assert settings.flags_for("tb-uuid") == {"auth"}
    assert settings.flags_for("OTHER") == {"ignore"}


# --- one definition per key: the loader's keys are the dataclass fields ----------------


def plain_fields(model: type) -> list[str]:
    """The fields of a section dataclass that are plain keys of the file."""
    return [
        f.name
        for f in dataclasses.fields(model)
        if setting_of(f).not_a_key is None and not setting_of(f).sub_tables
    ]


def test_every_section_is_a_config_field_and_every_config_field_a_section(
    tmp_path: Path,
) -> None:
    in_the_file = [f.name for f in dataclasses.fields(Config) if setting_of(f).not_a_key is None]
    assert list(SCHEMA) == in_the_file
    with pytest.raises(ConfigError) as problem:
        load_text(tmp_path, "[no_such_section]\n")
    listed = str(problem.value).split("known sections are: ")[1].rstrip(".")
    assert listed == ", ".join(f"[{name}]" for name in in_the_file)
    # Every field that is not in the file says why not.
    for model in [Config, *(s.model for s in sections_of(Config).values())]:
        for item in dataclasses.fields(model):
            reason = setting_of(item).not_a_key
            assert reason is None or reason.strip(), (model, item.name)


@pytest.mark.parametrize("section", [s for s in SCHEMA if SCHEMA[s]])
def test_every_field_is_a_key_the_loader_knows(tmp_path: Path, section: str) -> None:
    """The keys the loader lists (and so accepts) are the section dataclass's fields."""
    model = sections_of(Config)[section].model
    with pytest.raises(ConfigError) as problem:
        load_text(tmp_path, f"[{section}]\nno_such_key = 1\n")
    listed = str(problem.value).split("known keys are: ")[1].rstrip(".").split(", ")
    assert listed == plain_fields(model) == list(SCHEMA[section])


def as_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string for these plain values
    assert isinstance(value, tuple), value
    return "[" + ", ".join(as_toml(v) for v in value) + "]"


def test_every_field_can_be_written_in_the_file_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each field, set in the file to a value it may hold, is accepted and lands in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("socket.getfqdn", lambda: "mail.example.org")
    defaults = load_config(None)
    examples = {("delivery", "local_domains"): ("example.org",), ("tls", "key"): tmp_path / "k"}
    examples[("tls", "certificate")] = tmp_path / "c"
    examples[("relay", "smarthost")] = "smtp.example.net:587"
    lines = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key in keys:
            value = examples.get((section, key), getattr(getattr(defaults, section), key))
            if value is not None:
                lines.append(f"{key} = {as_toml(value)}")
    config = load_text(tmp_path, "\n".join(lines) + "\n")
    for section, keys in SCHEMA.items():
        for key in keys:
            expected = examples.get((section, key), getattr(getattr(defaults, section), key))
            assert getattr(getattr(config, section), key) == expected, (section, key)


# --- a key added later: a field with metadata is all it takes ---------------------------


@dataclass(frozen=True)
class GreylistConfig:
    """A section a later change might add, declared the way model.py declares its own."""

    enabled: bool = False
    delay: int = field(default=300, metadata=setting(check=checks.count))
    mode: str = field(default="soft", metadata=setting(check=checks.one_of("soft", "hard")))
    database: Path = field(kw_only=True, metadata=setting(in_data_dir="greylist.sqlite3"))
    listener: str = field(default="", metadata=setting(check=checks.endpoint))
    allowlist: Path | None = None


@dataclass(frozen=True)
class LimitsWithWidgets(LimitsConfig):
    max_widgets: int = 7  # a new key in an existing section: its type says "positive"


@dataclass(frozen=True)
class ExtendedConfig(Config):
    limits: LimitsWithWidgets
    greylist: GreylistConfig | None = None


@dataclass(frozen=True)
class Untyped:
    ratio: float = 0.5  # no check for float, and none named


@dataclass(frozen=True)
class ConfigWithUntyped(Config):
    untyped: Untyped | None = None


def build_extended(tmp_path: Path, document: dict[str, Any]) -> Any:
    return build_config(document, tmp_path, model=ExtendedConfig)


def test_a_new_field_with_metadata_gets_its_default_and_check(tmp_path: Path) -> None:
    config = build_extended(tmp_path, {})
    assert config.greylist == GreylistConfig(
        database=tmp_path / "clientid-mta-data" / "greylist.sqlite3"
    )
    assert config.limits.max_widgets == 7
    moved = build_extended(tmp_path, {"server": {"data_dir": "/srv/x"}, "greylist": {}})
    assert moved.greylist.database == Path("/srv/x/greylist.sqlite3")
    chosen = build_extended(
        tmp_path,
        {
            "greylist": {"delay": 0, "mode": "hard", "allowlist": "allow.txt", "enabled": True},
            "limits": {"max_widgets": 3},
        },
    )
    assert (chosen.greylist.delay, chosen.greylist.mode) == (0, "hard")
    assert chosen.greylist.allowlist == tmp_path / "allow.txt" and chosen.greylist.enabled
    assert chosen.limits.max_widgets == 3


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"greylist": {"mode": "maybe"}}, '[greylist] mode must be one of "soft", "hard".'),
        ({"greylist": {"delay": -1}}, "[greylist] delay must be a whole number, 0 or more."),
        ({"greylist": {"enabled": "yes"}}, "[greylist] enabled must be true or false."),
        ({"greylist": {"allowlist": ""}}, "[greylist] allowlist must be a file path string."),
        (
            {"greylist": {"listener": "nonsense:1"}},
            "[greylist] listener is not a Twisted endpoint description "
            f"(Unknown endpoint type: 'nonsense'); {ENDPOINT_HINT}",
        ),
        (
            {"greylist": {"dela": 1}},
            '[greylist] has an unknown key "dela" (did you mean "delay"?); '
            "known keys are: enabled, delay, mode, database, listener, allowlist.",
        ),
        ({"limits": {"max_widgets": 0}}, "[limits] max_widgets must be a positive whole number."),
        (
            {"greylst": {}},
            f'unknown section [greylst] (did you mean "greylist"?); known sections are: '
            f"{SECTION_LIST}, [greylist].",
        ),
    ],
)
def test_a_new_field_with_metadata_is_checked_like_the_others(
    tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as problem:
        build_extended(tmp_path, document)
    assert str(problem.value) == "config error: " + message


def test_a_field_whose_type_has_no_check_must_name_one(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"Untyped\.ratio"):
        build_config({}, tmp_path, model=ConfigWithUntyped)


# --- no reactor at import ---------------------------------------------------------------


def test_loading_the_config_leaves_the_reactor_to_the_program(tmp_path: Path) -> None:
    """Importing the config and checking endpoint descriptions installs no reactor, so a
    program can still choose one (here asyncio) afterwards."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        from clientid_mta.config import load_config

        load_config(None)
        path = Path("c.toml")
        path.write_text('[listen]\\nsubmission = "tcp:587"\\nsubmissions = "unix:/tmp/s"\\n')
        assert load_config(path).listen.submission == "tcp:587"
        assert "twisted.internet.reactor" not in sys.modules, "the reactor was imported"

        from twisted.internet import asyncioreactor

        asyncioreactor.install()
        from twisted.internet import reactor

        print(type(reactor).__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AsyncioSelectorReactor"


# --- the README's tables are the keys --------------------------------------------------


def readme_tables() -> dict[str, list[str]]:
    """Heading of each table in the README's Configuration section -> its first column."""
    readme = (ROOT / "README.md").read_text()
    part = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[str]] = {}
    heading = None
    for line in part.splitlines():
        found = re.match(r"#{3,4} `(\[.+\])`$", line)
        if found:
            heading = found.group(1)
            tables[heading] = []
            continue
        row = re.match(r"\| `([^`]+)` \|", line)
        if row and heading is not None:
            tables[heading].append(row.group(1))
    return tables


def documented_tables() -> dict[str, list[str]]:
    """What readme_tables() must find, from the dataclasses."""
    expected: dict[str, list[str]] = {}
    for name, section in sections_of(Config).items():
        if section.only_named_tables:
            expected[f'[{name}."<domain>"]'] = list(keys_of(section.model)[0])
            continue
        expected[f"[{name}]"] = list(section.keys)
        for table in section.sub_tables:
            # Their tables list the flags a type can have.
            expected[f'[{name}.{table}."<name or glob>"]'] = list(TYPE_FLAGS)
    return expected


def test_readme_config_tables_list_exactly_the_keys() -> None:
    tables, expected = readme_tables(), documented_tables()
    assert list(tables) == list(expected), "README headings differ from the sections"
    for heading, keys in expected.items():
        missing = [k for k in keys if k not in tables[heading]]
        extra = [k for k in tables[heading] if k not in keys]
        assert not missing and not extra, f"README {heading}: missing {missing}, unknown {extra}"
        assert tables[heading] == keys, f"README {heading}: rows not in the fields' order"
