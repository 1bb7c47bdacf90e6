"""How one config section becomes its typed dataclass: every key known, every value of its field's type, then the
section's own checks (its `validate()`). One place for all of it, so every bad key or value gets the same one line
(gpt.errors.ConfigError: the key, the value, what is valid). Plain Python: no torch, no OmegaConf."""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from gpt.errors import ConfigError

T = TypeVar("T")
KEY = "key"  # a field's metadata entry: its key in configs/ when that is not its name
REQUIRED = "???"  # OmegaConf's mark of a value that must be given
NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true or false"),
         str: ("a string", "strings")}


def renamed(key: str, default: Any) -> Any:
    """A field whose config key is not its name: a Python keyword (checkpoint.async is CheckpointConfig.async_save)."""
    return dataclasses.field(default=default, metadata={KEY: key})


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get(KEY, f.name)


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def default_of(f: dataclasses.Field) -> Any:
    """The field's default, or REQUIRED when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def section(cls: type[T], key: str, values: Mapping[str, Any] | None) -> T:
    """`values` (plain dicts, lists and scalars) as a `cls`: unknown keys and wrong types refused, then the section's
    own checks. `key` is where the section sits in the config ("" for the whole of it), for the messages."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(key, values, f"a mapping of {key} keys")
    fields = {key_of(f): f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(join(key, name), value, moved_to(cls, name) or known_keys(cls, key))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[f.name] = typed(join(key, name), values[name], hints[f.name])
        elif default_of(f) == REQUIRED:
            raise ConfigError(join(key, name), REQUIRED, "a value: this key has no default")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def only_own_keys(obj: Any, key: str, presets: Mapping[str, tuple[str, ...]]) -> None:
    """A section that is the union of its presets' keys (strategy, cluster): the chosen preset (`obj.name`) reads
    its own; a non-default value of a key only other presets read is refused, naming them."""
    reads = presets[obj.name]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name != "name" and f.name not in reads and value != default_of(f):
            owners = "|".join(p for p, keys in presets.items() if f.name in keys)
            raise ConfigError(f"{key}.{f.name}", value, f"{key}={obj.name} reads "
                              f"{', '.join(sorted(('name', *reads)))} ({key}.{f.name} is for {key}={owners})")


def moved_to(cls: type, name: str) -> str | None:
    """Where a key the section no longer has went (one key per knob: a section lists them in its MOVED), so that an
    old command gets the key to use."""
    new = getattr(cls, "MOVED", {}).get(name)
    return f"use {new} instead" if new else None


def known_keys(cls: type, key: str) -> str:
    names = sorted(key_of(f) for f in dataclasses.fields(cls))
    return f"known {key or 'top-level'} keys are {', '.join(names)}"


def typed(key: str, value: Any, tp: Any) -> Any:
    """`value` as a `tp`: ints are numbers too, a list may be a tuple; unions of several types are left to the
    section's validate()."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return section(tp, key, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        return typed(key, value, options[0]) if len(options) == 1 else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, describe(tp))
        try:
            items = [typed(key, v, args[0]) for v in value]
        except ConfigError:
            raise ConfigError(key, value, describe(tp)) from None
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, describe(tp))
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(key, value, describe(tp))
    return value


def describe(tp: Any, plural: bool = False) -> str:
    """What a value of type `tp` is, for a message: "an integer", "a list of numbers", "a string, or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a, plural) for a in options)
        return text + (", or null" if len(options) < len(args) else "")
    if origin in (list, tuple):
        return "lists" if plural else f"a list of {describe(args[0], plural=True)}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mappings" if plural else "a mapping"
    if tp in NAMES:
        return NAMES[tp][plural]
    return "values" if plural else "a value"


def to_plain(obj: Any) -> Any:
    """A section (or the whole tree) as plain dicts and lists under the config's keys, as configs/ writes them."""
    if dataclasses.is_dataclass(obj):
        return {key_of(f): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
