"""A frozen dataclass that checks its own fields: ``Policy`` and what it holds (policy.py).

``build_fields`` reads each field's type (a real annotation: this module's
users do not postpone theirs) and bounds (its metadata: ``gt``, ``ge``,
``le``, which pydantic reads too for the JSON schema) and takes a value the
way JSON gives it, strictly: no ``"256"`` for 256, no ``true`` for 1, a list
for a tuple. What is wrong is said in pydantic's words, which every door has
used, with where it is (``filesystem_access.1.source``); an unknown field
names the nearest known one. ``Checked`` is the base of such a class: built
from a dict, a short form or an instance (``coerce``), written as JSON
(``to_dict``, ``json_value``: results use it too), and read by pydantic models through
``coerce`` too.
"""

import base64
import dataclasses
import difflib
import math
import operator
import types
import typing
from typing import Any, Literal

from .errors import PolicyError, printable

Problems = list[tuple[tuple[str | int, ...], str]]
MAX_PROBLEMS_SAID = 20  # a message names this many (``problems`` holds them all: each list is bounded)
_NAME_SAID = 64  # of an unknown field's name


class FieldError(ValueError):
    """A value a field refuses, with where it is (``loc``) under the field; ``problems``: every
    (where, message) in it, where it holds several (the items of a list, the keys of a dict)."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = (), problems: Problems | None = None) -> None:
        super().__init__(message)
        self.loc = loc
        self.problems: Problems = problems or [(loc, message)]

    @classmethod
    def of(cls, problems: Problems) -> "FieldError":
        """One error for several problems (at least one), read as the first."""
        loc, message = problems[0]
        return cls(message, loc, problems)


def describe(description: str, **keys: Any) -> dict[str, Any]:
    """A dataclass field's metadata: its description and bounds (``gt``, ``ge``, ``le``), which
    pydantic reads as it reads its own ``Field``'s keywords (``max_length``, ``pattern``,
    ``json_schema_extra``...); ``check``, a function a checked value then goes through (its
    ValueError is the field's problem), pydantic leaves alone."""
    return {"description": description, **keys}


def _number_text(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _check_length(
    value: list[Any] | tuple[Any, ...] | dict[Any, Any], what: str, bounds: typing.Mapping[str, Any]
) -> None:
    """A list or dict past its field's ``max_length`` is refused before its items are looked at:
    a request of two million wrong items was as many problems, seconds and gigabytes to say."""
    limit = bounds.get("max_length")
    if limit is not None and len(value) > limit:
        raise FieldError(f"{what} should have at most {limit} items after validation, not {len(value)}")


def check_value(value: Any, kind: Any, bounds: typing.Mapping[str, Any]) -> Any:
    """``value`` as a field of type ``kind`` takes it (strictly: as JSON gives it, a list for a
    tuple), within ``bounds``; else ``FieldError`` in pydantic's words, which every door has used."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        return check_value(value, next(a for a in args if a is not type(None)), bounds)
    if origin is Literal:
        if value not in args or not isinstance(value, str):
            words = [repr(a) for a in args]
            raise FieldError(
                "Input should be " + (f"{', '.join(words[:-1])} or " if len(words) > 1 else "") + words[-1]
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError("Input should be a list")
        _check_length(value, "List", bounds)
        items = []
        problems: Problems = []  # every item's, not only the first wrong one's
        for i, item in enumerate(value):
            try:
                items.append(check_value(item, args[0], {}))
            except FieldError as exc:
                problems.extend(((i, *where), message) for where, message in exc.problems)
            except ValueError as exc:  # a Mount's or a SecretGrant's own check
                said = getattr(exc, "problems", None) or [((), str(exc))]
                problems.extend(((i, *where), message) for where, message in said)
        if problems:
            raise FieldError.of(problems)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError("Input should be a valid dictionary")
        _check_length(value, "Dictionary", bounds)
        wrong: Problems = [
            ((str(key),), "Input should be a valid string")
            for key, item in value.items()
            if not isinstance(key, str) or not isinstance(item, str)
        ]
        if wrong:
            raise FieldError.of(wrong)
        return dict(value)
    if isinstance(kind, type) and hasattr(kind, "coerce"):  # Mount, SecretGrant
        return kind.coerce(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise FieldError("Input should be a valid boolean")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise FieldError("Input should be a valid string")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError("Input should be a valid integer")
    elif kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FieldError("Input should be a valid number")
        try:
            value = float(value)
        except OverflowError:  # an integer past any float (JSON allows one): no number a bound holds
            raise FieldError("Input should be a valid number") from None
        if not math.isfinite(value):  # NaN holds no bound and says nothing a bound's words would name
            raise FieldError("Input should be a finite number")
    for name, word, holds in (
        ("gt", "greater than", operator.gt),
        ("ge", "greater than or equal to", operator.ge),
        ("le", "less than or equal to", operator.le),
    ):
        if name in bounds and not holds(value, bounds[name]):  # NaN holds no bound: refused
            raise FieldError(f"Input should be {word} {_number_text(bounds[name])}")
    return value


# What other sandboxes (docker, E2B, Modal) call a field that is spelt differently here.
_OTHER_NAMES = {
    "mounts": "filesystem_access",
    "mount": "filesystem_access",
    "volumes": "filesystem_access",
    "binds": "filesystem_access",
    "cpus": "cpu_limit",
    "env": "environment",
    "env_vars": "environment",
}


def nearest(name: str, known: typing.Iterable[str]) -> str | None:
    """The known name ``name`` most likely meant: one it begins (``cpu_time`` for
    ``cpu_time_seconds``), else the closest spelling of a whole name or of its first part
    (``timout`` for ``timeout_seconds``), else None."""
    names = list(known)
    if _OTHER_NAMES.get(name) in names:
        return _OTHER_NAMES[name]
    # One it begins whole words of: "files" is not filesystem_access's beginning.
    begun = [k for k in names if k.startswith(name) and k[len(name) : len(name) + 1] in ("", "_")]
    if name and begun:
        return min(begun, key=len)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    if close:
        return close[0]
    stems = {k.split("_")[0]: k for k in reversed(names)}  # the first name of a stem wins
    close = difflib.get_close_matches(name, list(stems), n=1, cutoff=0.75)
    return stems[close[0]] if close else None


def build_fields(cls: type, given: dict[str, Any], problems: Problems) -> dict[str, Any]:
    """Each field of dataclass ``cls`` from ``given`` (or its default), checked; what is wrong is
    added to ``problems`` as (where, message), an unknown field with the nearest known name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    unknown = [name for name in given if name not in known]
    named = MAX_PROBLEMS_SAID // 2  # each with its nearest known name (a search of them all); the rest counted
    for name in unknown[:named]:
        text = str(name)
        # No known name is longer than this: a longer one is not searched (the search is as long as
        # the name), and is said cut.
        near = nearest(text, known) if len(text) <= _NAME_SAID else None
        shown = printable(text if len(text) <= _NAME_SAID else text[:_NAME_SAID] + "...")
        problems.append(((shown,), f"unknown field (did you mean {near}?)" if near else "unknown field"))
    if len(unknown) > named:
        problems.append(((), f"{len(unknown) - named} more unknown fields"))
    for name, spec in known.items():
        if name not in given:
            if spec.default is not dataclasses.MISSING:
                values[name] = spec.default
            elif spec.default_factory is not dataclasses.MISSING:
                values[name] = spec.default_factory()
            else:
                problems.append(((name,), "Field required"))
            continue
        try:
            values[name] = check_value(given[name], spec.type, spec.metadata)
        except FieldError as exc:
            problems.extend(((name, *where), message) for where, message in exc.problems)
            continue
        if "check" in spec.metadata:
            try:
                values[name] = spec.metadata["check"](values[name])
            except ValueError as exc:
                problems.append(((name,), str(exc)))
    return values


def checked_fields(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """``build_fields``, raising the ``PolicyError`` that names every problem."""
    problems: Problems = []
    values = build_fields(cls, given, problems)
    if problems:
        raise problems_error(problems)
    return values


def set_fields(obj: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def problems_error(problems: Problems) -> PolicyError:
    said = "; ".join(
        f"{'.'.join(map(str, loc)) or 'policy'}: {message}" for loc, message in problems[:MAX_PROBLEMS_SAID]
    )
    if len(problems) > MAX_PROBLEMS_SAID:
        said += f"; and {len(problems) - MAX_PROBLEMS_SAID} more"
    error = PolicyError("invalid policy: " + said)
    error.problems = tuple(problems)
    return error


class Checked:
    """What Mount, SecretGrant and Policy share: built from a dict, a short form or an
    instance (``coerce``), and validated by pydantic models through ``coerce`` too."""

    @classmethod
    def coerce(cls, value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and hasattr(cls, "parse"):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(**value)
        raise FieldError(f"Input should be a valid dictionary or instance of {cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON has them (a tuple as a list, a nested value as its dict)."""
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        # pydantic's own schema of the dataclass gives the JSON schema and the serialisation;
        # what it takes in goes through ``coerce`` first, the same checks as everywhere.
        from pydantic_core import core_schema

        def coerce(value: Any) -> Any:
            try:
                return cls.coerce(value)
            except FieldError as exc:
                raise ValueError(str(exc)) from None

        return core_schema.no_info_before_validator_function(coerce, handler(source))


def json_value(value: Any) -> Any:
    """``value`` as JSON has it: a policy's or a result's dataclass as its ``to_dict``, a tuple as a
    list, bytes as base64 (the standard alphabet, as every other byte field of the daemon's
    protocol), a float that is no number as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()  # type: ignore[attr-defined]  # Checked, and result.py's dataclasses
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value
