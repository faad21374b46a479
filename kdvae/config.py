"""Settings declared once: an experiment's settings are one frozen dataclass.

Each field is declared with :func:`setting`: its name, type (the annotation), default,
help, and allowed values (``choices=`` or ``check=``). Everything else comes from there:

* the command line, :func:`parse`: one ``--flag`` per field (``--x/--no-x`` for a bool,
  ``3,4`` for a tuple of ints); a bad value is one line on stderr naming the flag, exit 2;
* presets: a class attribute ``PRESETS = {name: {setting: value}}`` and a ``preset``
  field; the flags given on the command line override the preset's values;
* validation: every construction of the dataclass checks every field
  (:meth:`Settings.__post_init__`), plus the rules between settings of :meth:`Settings.check`;
* the settings stored with each checkpoint and compared on ``--resume``
  (:meth:`Settings.training`): all but those declared ``training=False`` (where outputs go,
  how the finished model is evaluated).

Adding a setting is one line in the dataclass. Libraries that turn a dataclass into a
command line (tyro, simple_parsing) or Flax's ``ml_collections`` config flags declare
neither ranges nor presets as data, and report errors as multi-line blocks; the standard
library's ``dataclasses`` and ``argparse`` do this in the 150 lines below.

    @dataclasses.dataclass(frozen=True)
    class Settings(config.Settings):
        temperature: float = config.setting(8.0, "distillation temperature T",
                                            check=config.POSITIVE_NUMBER)

    settings = config.parse(Settings, argv, description=__doc__)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

__all__ = [
    "POSITIVE",
    "NON_EMPTY",
    "POSITIVE_NUMBER",
    "Check",
    "ConfigError",
    "Settings",
    "at_least",
    "between",
    "make",
    "positive_up_to",
    "parse",
    "setting",
]

EXIT_USAGE = 2


class ConfigError(ValueError):
    """A setting is invalid or does not fit the data or checkpoint; the message says which."""


@dataclasses.dataclass(frozen=True)
class Check:
    """An allowed range: ``text`` completes "--flag must be ...", ``ok(value)`` tests it."""

    text: str
    ok: Callable[[Any], bool]


def at_least(low: float) -> Check:
    return Check(f">= {low}", lambda v: v >= low)


def between(low: float, high: float, text: str | None = None) -> Check:
    """``low <= value <= high`` (so never NaN)."""
    shown = [f"{x:,}" if isinstance(x, int) else f"{x:g}" for x in (low, high)]
    return Check(text or f"in [{shown[0]}, {shown[1]}]", lambda v: low <= v <= high)


def positive_up_to(high: float) -> Check:
    """``0 < value <= high``: a finite positive number."""
    return Check(f"positive and at most {high:g}", lambda v: 0 < v <= high)


POSITIVE = Check("positive", lambda v: v > 0)
POSITIVE_NUMBER = Check("a positive number", lambda v: math.isfinite(v) and v > 0)
NON_EMPTY = Check("a non-empty path", lambda v: bool(v.strip()))


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    flag: str | None = None,
    training: bool = True,
    hidden: bool = False,
    legacy: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field declaring one setting.

    Args:
      default: the value when neither a preset nor a flag sets it.
      help: one line for ``--help``.
      choices: the allowed values, if a fixed set.
      check: the allowed range otherwise (:class:`Check`); ``None`` values pass.
      flag: the flag's name without ``--``; default the field's, ``_`` as ``-``.
      training: ``False`` for settings that do not change what is trained; they are not
        stored with checkpoints, and ``--resume`` may change them.
      hidden: leave the flag out of ``--help`` (for tests).
      legacy: for a training setting added after runs were stored: the value those runs
        were trained with. At that value it is left out of the stored config, so the
        older checkpoints still resume; at any other it is stored, and they are refused.
    """
    meta = dict(
        help=help, choices=choices, check=check, flag=flag, training=training, hidden=hidden,
        legacy=legacy,
    )  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    """``--teacher-epochs`` for the field ``teacher_epochs``."""
    return "--" + (field.metadata.get("flag") or field.name.replace("_", "-"))


def _base_type(hint: Any) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; ``(tuple, False)`` for ``tuple[int, ...]``."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    return typing.get_origin(hint) or hint, optional


def _element_type(hint: Any) -> type:
    """``str`` for ``tuple[str, ...]`` (or ``tuple[str, ...] | None``)."""
    args = typing.get_args(hint)
    if type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
    return typing.get_args(hint)[0]


def _check_field(field: dataclasses.Field, hint: Any, value: Any) -> None:
    base, optional = _base_type(hint)
    name = flag_name(field)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must be set, got None.")
    accepted = (int, float) if base is float else base
    if not isinstance(value, accepted) or (base is not bool and isinstance(value, bool)):
        article = "an" if base.__name__[0] in "aeiou" else "a"
        raise ConfigError(f"{name} must be {article} {base.__name__}, got {value!r}.")
    choices, check = field.metadata.get("choices"), field.metadata.get("check")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, got {value!r}.")
    if check is not None and not check.ok(value):
        raise ConfigError(f"{name} must be {check.text}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of a settings dataclass: every construction validates every field."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            _check_field(field, hints[field.name], getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Rules between settings; raise :class:`ConfigError` naming the flags."""

    def to_dict(self) -> dict[str, Any]:
        """Every setting (as written to ``results.json``)."""
        return dataclasses.asdict(self)

    def training(self) -> dict[str, Any]:
        """The settings that change what is trained (stored with checkpoints), less those
        at their ``legacy`` value (see :func:`setting`)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("training", True)
            and getattr(self, f.name) != f.metadata.get("legacy", dataclasses.MISSING)
        }


def make(cls: type[Settings], **values: Any) -> Settings:
    """``cls`` from its preset (``values["preset"]`` or the default) and ``values``.

    Raises :class:`ConfigError` naming the flag of the first bad setting.
    """
    if cls.PRESETS:
        default = {f.name: f.default for f in dataclasses.fields(cls)}.get("preset")
        preset = values.get("preset", default)
        if preset not in cls.PRESETS:
            raise ConfigError(f"--preset must be one of {sorted(cls.PRESETS)}, got {preset!r}.")
        values = {**cls.PRESETS[preset], **values}
    return cls(**values)


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line on stderr (no usage block), exit status 2. A value may be a
    negative number in any float syntax (``--lr -1e-3`` is a value, refused by its range,
    not a missing argument)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(  # argparse's own: no exponents
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE
        )

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text: str) -> tuple[int, ...]:
    """``"7,8"`` -> ``(7, 8)`` (for argparse)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def str_list(text: str) -> tuple[str, ...]:
    """``"kd, dkd"`` -> ``("kd", "dkd")`` (for argparse)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any) -> None:
    base, _ = _base_type(hint)
    meta = field.metadata
    text = f"{meta['help']} (default: {field.default})".replace("%", "%%")  # not a format
    kwargs: dict[str, Any] = dict(dest=field.name, default=None)
    kwargs["help"] = argparse.SUPPRESS if meta["hidden"] else text
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif base is tuple and _element_type(hint) is str:
        kwargs.update(type=str_list, metavar="A,B")
    elif base is tuple:
        kwargs.update(type=int_list, metavar="I,J")
    else:
        kwargs["type"] = base
    parser.add_argument(flag_name(field), **kwargs)


def parse(cls: type[Settings], argv: Sequence[str] | None = None, *, description=None):
    """The settings from the command line, under the chosen preset.

    A bad flag or value prints one line naming it and exits with status 2.
    """
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        _add_flag(parser, field, hints[field.name])
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return make(cls, **given)
    except ConfigError as err:
        parser.error(str(err))
