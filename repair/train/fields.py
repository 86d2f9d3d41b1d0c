"""Checks at the boundary of the Python API: the value objects' fields and the public functions' arguments.

A value object (``TrainConfig``, ``Objective``, ``DataOptions``) checks each field against its annotation
and the ``min`` / ``max`` of its metadata when it is made, so a bad value is refused in one line with the
same message whether it came from a flag (the CLI builds these objects) or from Python. :func:`checked`
does the same for a public function's arguments: ``evaluate("file")`` is refused or taken as one file
as its annotation says, never iterated character by character.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from repair.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])


def check_fields(value_object: Any) -> None:
    """Each dataclass field of the right type (``int`` is not ``bool``; floats finite) and within the bounds
    ``min`` / ``max`` of its metadata; a one-line :class:`UsageError` naming the field otherwise."""
    hints = typing.get_type_hints(type(value_object))
    for field in dataclasses.fields(value_object):
        value = getattr(value_object, field.name)
        if not fits(value, hints[field.name]):
            raise UsageError(f"{field.name} must be {describe(hints[field.name])}, not {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{field.name} must be a finite number, got {value}")
        low, high = field.metadata.get("min"), field.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if low is not None and value < low:
                raise UsageError(f"{field.name} must be at least {low}, got {value}")
            if high is not None and value > high:
                raise UsageError(f"{field.name} must be at most {high}, got {value}")


def checked(function: F) -> F:
    """Refuse arguments that do not fit the function's annotations, in one line, before it runs."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hints = typing.get_type_hints(function)
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if name in hints and not fits(value, hints[name]):
                raise UsageError(f"{function.__name__}(): {name} must be {describe(hints[name])}, not {_shown(value)}")
        return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is what ``hint`` says (unions, optionals, paths, sequences, mappings, callables)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            return False  # a string is one value here, never a sequence of characters
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(fits, value, args))
        return not args or all(fits(item, args[0]) for item in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if origin is typing.Literal:
        return value in args
    return not isinstance(hint, type) or isinstance(value, hint)


def describe(hint: Any) -> str:
    """``str | Path | None`` -> 'a str, a path or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [describe(arg) for arg in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if hint is type(None) or hint is None:
        return "None"
    if hint is Path:
        return "a path"
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of ({describe(args[0])})" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if origin is collections.abc.Callable:
        return "a function"
    name = getattr(hint, "__name__", str(hint))
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
