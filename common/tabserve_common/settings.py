"""One settings object per process, read once at start from `--flags` and `<PREFIX>FIELD` variables (flags win).

A process declares a frozen dataclass deriving from `Settings` whose fields are `setting(...)`s. A field's
allowed values are declared with it (`minimum=`, `above=`, `address=`, ...); relations between fields go in
the class's `check()`. A secret (`env_only=True`) is read from its variable only: a flag would show its
value in any process list, so the flag is refused with a message naming the variable and the `<name>_file`
setting when there is one. Every instance is checked however it is built (`load()`, the constructor,
`dataclasses.replace`), and a bad value raises `SettingsError`, one line naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Self

from tabserve_common.address import is_loopback, split_address

__all__ = ["LOG_LEVELS", "Settings", "SettingsError", "setting", "settings_table"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting has a value it may not take; the message is one line naming its flag and environment variable."""


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    choices: Sequence[str] = (),
    address: bool = False,
    non_empty: bool = False,
    allow_empty: bool = False,
    env_only: bool = False,
) -> Any:
    """A settings field: its default, its documentation (--help, README table) and the values it may take.

    `minimum` / `maximum`: inclusive bounds; `above`: exclusive lower bound; `choices`: allowed words (any
    case); `address`: `host:port` with a port in 0..65535 (or empty, with `allow_empty`: "no listener");
    `non_empty`: the empty string is refused; `env_only`: a secret, taken from the environment variable only
    (its flag is refused).
    """
    rules = {"minimum": minimum, "above": above, "maximum": maximum, "choices": tuple(choices),
             "address": address, "non_empty": non_empty, "allow_empty": allow_empty, "env_only": env_only}
    # A secret stays out of the settings' repr, so logging the settings never logs it.
    return field(default=default, metadata={"help": help, **rules}, repr=not env_only)


def _is_address(value: Any) -> bool:
    try:
        split_address(value)
    except ValueError:
        return False
    return True


def _rules(meta: Mapping[str, Any]) -> list[tuple[str, Callable[[Any], bool]]]:
    """(wording, test) of each rule declared for a field, in the order the README and the errors state them."""
    rules: list[tuple[str, Callable[[Any], bool]]] = []
    minimum, above, maximum, choices = meta.get("minimum"), meta.get("above"), meta.get("maximum"), meta.get("choices")
    # `not (v < bound)` would let NaN through; every comparison with NaN is false, so these refuse it.
    if minimum is not None:
        rules.append((f">= {minimum}", lambda v: v >= minimum))
    if above is not None:
        rules.append((f"> {above}", lambda v: v > above))
    if maximum is not None:
        rules.append((f"<= {maximum}", lambda v: v <= maximum))
    if choices:
        rules.append(("one of " + ", ".join(choices), lambda v: str(v).upper() in choices))
    if meta.get("address") and meta.get("allow_empty"):
        rules.append(("host:port (port 0-65535) or empty", lambda v: v == "" or _is_address(v)))
    elif meta.get("address"):
        rules.append(("host:port (port 0-65535)", _is_address))
    if meta.get("non_empty"):
        rules.append(("non-empty", bool))
    return rules


def _problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    rules = _rules(meta)
    if all(test(value) for _, test in rules):
        return None
    return "must be " + " and ".join(wording for wording, _ in rules)


def _base_type(annotation: Any) -> Any:
    """int | None -> int; str -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _convert(kind: Any, text: str) -> Any:
    """Text of a flag or variable → the field's type; ValueError says what was expected."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError("must be true or false (also 1/0, yes/no, on/off)")
    try:
        return int(text) if kind is int else float(text) if kind is float else text
    except ValueError:
        raise ValueError("must be an integer" if kind is int else "must be a number") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print its usage block and exit; a bad setting is one line, like every other.
        raise SettingsError(f"{message} (--help lists the settings)")


@dataclass(frozen=True)
class Settings:
    """Base of a process's settings: class variables `env_prefix` (e.g. `TABSERVE_SERVER_`) and `program`."""

    env_prefix: ClassVar[str] = ""
    program: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _problem(value, f.metadata)
            if problem:
                raise self.invalid(f.name, problem, value)
        self.check()

    def check(self) -> None:
        """Relations between fields (a field's own range is declared with it); raise `self.invalid(...)`."""

    def require_together(self, name: str, other: str) -> None:
        """Two settings that mean something only as a pair (a certificate and its key): both set or neither."""
        self.require(name, other)
        self.require(other, name)

    def require(self, name: str, needed: str) -> None:
        """`name`, when set, needs `needed` set too (e.g. a client CA needs the server's own certificate)."""
        if getattr(self, name) and not getattr(self, needed):
            raise self.invalid(name, f"needs {_flag(needed)} set too", getattr(self, name))

    def loopback_unless(self, name: str, *needed: tuple[str, ...]) -> None:
        """The address `name` must be loopback unless every group in `needed` has one of its settings set (e.g.
        a token given either way, and TLS)."""
        if is_loopback(split_address(getattr(self, name))[0]):
            return
        for group in needed:
            if not any(getattr(self, other) for other in group):
                given = " or ".join(self._source(other) for other in group)
                raise self.invalid(name, f"must be loopback unless {given} is set", getattr(self, name))

    @classmethod
    def _source(cls, name: str) -> str:
        """How a setting is given: its flag, or its variable for an `env_only` one."""
        env_only = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("env_only")
        return cls.env_name(name) if env_only else _flag(name)

    def exclusive(self, name: str, other: str) -> None:
        """Two ways of giving one thing (a secret's value and its file): at most one of them."""
        if getattr(self, name) and getattr(self, other):
            raise self.invalid(name, f"must be empty when {_flag(other)} is set", "(hidden)")

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.env_prefix + name.upper()

    @classmethod
    def invalid(cls, name: str, problem: str, value: Any) -> SettingsError:
        """E.g. `invalid --workers / TABSERVE_SERVER_WORKERS: must be >= 0, got -3`."""
        return SettingsError(f"invalid {_flag(name)} / {cls.env_name(name)}: {problem}, got {value!r}")

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Self:
        """Defaults, then `<env_prefix>FIELD` variables, then `--field` flags; raises SettingsError."""
        environ = os.environ if environ is None else environ
        names = [f.name for f in dataclasses.fields(cls)]
        raw = {name: environ[cls.env_name(name)] for name in names if cls.env_name(name) in environ}
        flags = _parser(cls).parse_args(list(argv) if argv is not None else None)
        raw.update({name: text for name, text in vars(flags).items() if text is not None})
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, text in raw.items():
            try:
                values[name] = _convert(_base_type(hints[name]), text)
            except ValueError as exc:
                raise cls.invalid(name, str(exc), text) from None
        return cls(**values)

    @classmethod
    def load_or_exit(cls, argv: Sequence[str] | None = None) -> Self:
        """`load()` for an entry point: bad settings end the process with status 2 and one line on stderr."""
        try:
            return cls.load(argv)
        except SettingsError as exc:
            print(f"{cls.program}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def _secret_refusal(cls: type[Settings], name: str) -> type[argparse.Action]:
    """The action of an `env_only` field's flag: refuse, saying where the secret goes instead."""
    names = {f.name for f in dataclasses.fields(cls)}
    instead = f"{_flag(name + '_file')} FILE or " if name + "_file" in names else ""

    class Refuse(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            raise SettingsError(
                f"{_flag(name)} is not accepted: a secret on the command line shows in every process list; "
                f"use {instead}the environment variable {cls.env_name(name)}"
            )

    return Refuse


def _parser(cls: type[Settings]) -> argparse.ArgumentParser:
    """Every field as a flag taking text (converted by `load`); booleans also as bare switches; the flag of an
    `env_only` field refuses any value."""
    # No abbreviations: `--max-worker` must not silently mean `--max-workers` (a typo in a manifest would
    # change a setting today and another one the day a longer flag with the same prefix is added).
    parser = _Parser(prog=cls.program or None, description=cls.__doc__, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("env_only"):
            parser.add_argument(_flag(f.name), dest=f.name, nargs="?", action=_secret_refusal(cls, f.name),
                                help=f"refused: set {cls.env_name(f.name)} instead (a secret)")
            continue
        switch: dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=None,
            help=f"{f.metadata.get('help', '').replace('%', '%%')} [env {cls.env_name(f.name)}; default {f.default!r}; "
            f"allowed: {_allowed(hints[f.name], f.metadata)}]",
            **(switch if _base_type(hints[f.name]) is bool else {}),
        )
    return parser


def _allowed(annotation: Any, meta: Mapping[str, Any]) -> str:
    if _base_type(annotation) is bool:
        return "true, false"
    return " and ".join(wording for wording, _ in _rules(meta)) or "any"


def settings_table(cls: type[Settings]) -> str:
    """Markdown table of every setting with its allowed values (the README holds it; a test keeps it in sync)."""
    hints = typing.get_type_hints(cls)
    lines = ["| flag | environment variable | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        flag = "(environment only)" if f.metadata.get("env_only") else f"`{_flag(f.name)}`"
        lines.append(
            f"| {flag} | `{cls.env_name(f.name)}` | `{f.default!r}` | {_allowed(hints[f.name], f.metadata)} "
            f"| {f.metadata.get('help', '')} |"
        )
    return "\n".join(lines)
