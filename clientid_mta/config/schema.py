"""The sections and keys of the file, derived from the dataclass fields in ``model.py``.

``sections_of(Config)`` lists, in field order, each [section] with its plain keys (name,
check, default) and the fields filled from named sub-tables. Nothing here is written
by hand per key: a new field in a section dataclass is a new key.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clientid_mta.config import checks
from clientid_mta.config.checks import Check
from clientid_mta.config.model import Config, setting_of


@dataclass(frozen=True)
class Key:
    """One plain key of a section, as the loader checks it."""

    name: str
    check: Check | None  # None: a path, relative to the config file's folder
    field: dataclasses.Field[Any]

    def default(self, folder: Path, data_dir: Path) -> Any:
        """The value when the file leaves the key out; relative paths follow ``folder``."""
        in_data_dir = setting_of(self.field).in_data_dir
        if in_data_dir is not None:
            value: Any = data_dir / in_data_dir
        elif self.field.default_factory is not dataclasses.MISSING:
            value = self.field.default_factory()
        else:
            value = self.field.default
        if isinstance(value, Path) and not value.is_absolute():
            value = folder / value
        return value


@dataclass(frozen=True)
class Section:
    """One [section] of the file and the dataclass it becomes."""

    name: str
    model: type  # the section's dataclass; for named tables, each table's
    keys: dict[str, Key]  # the plain keys, in field order
    sub_tables: tuple[str, ...] = ()  # keys that hold named tables ([clientid.types."X"])
    # Every key of the section is the name of a table ([dkim."example.org"]).
    only_named_tables: bool = False


@functools.cache
def sections_of(model: type = Config) -> dict[str, Section]:
    """The sections of a config model: its fields whose type is a dataclass, or that are
    filled from named tables; other fields (``Config.source``) are not in the file."""
    hints = typing.get_type_hints(model)
    sections: dict[str, Section] = {}
    for field in dataclasses.fields(model):
        spec = setting_of(field)
        if spec.not_a_key is not None:
            continue
        if spec.sub_tables:  # a tuple of dataclasses, one per table
            (table_model, _more) = typing.get_args(hints[field.name])
            sections[field.name] = Section(field.name, table_model, {}, only_named_tables=True)
            continue
        section_model = _without_none(hints[field.name])
        if not dataclasses.is_dataclass(section_model):
            raise TypeError(f"{model.__name__}.{field.name} is neither a section nor a table")
        assert isinstance(section_model, type)
        keys, sub_tables = keys_of(section_model)
        sections[field.name] = Section(field.name, section_model, keys, sub_tables)
    return sections


def keys_of(section_model: type) -> tuple[dict[str, Key], tuple[str, ...]]:
    """The plain keys of a section dataclass, and its fields that hold named tables."""
    hints = typing.get_type_hints(section_model)
    keys: dict[str, Key] = {}
    sub_tables: list[str] = []
    for field in dataclasses.fields(section_model):
        spec = setting_of(field)
        if spec.not_a_key is not None:
            continue
        if spec.sub_tables:
            sub_tables.append(field.name)
            continue
        keys[field.name] = Key(field.name, _check(section_model, field, hints[field.name]), field)
    return keys, tuple(sub_tables)


def _check(section_model: type, field: dataclasses.Field[Any], hint: Any) -> Check | None:
    spec = setting_of(field)
    if spec.check is not None:
        return spec.check
    if _without_none(hint) is Path:
        return None
    check = checks.for_type(hint)
    if check is None:
        raise TypeError(
            f"{section_model.__name__}.{field.name}: no check for a key of type {hint}; "
            "name one with field(metadata=setting(check=...))"
        )
    return check


def _without_none(hint: Any) -> Any:
    """``X | None`` -> ``X``; anything else as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


SECTIONS = sections_of(Config)
# section -> key -> Key, in file order (the fuzz tests draw key names from it).
SCHEMA: dict[str, dict[str, Key]] = {name: section.keys for name, section in SECTIONS.items()}
