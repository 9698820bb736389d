"""A spec's parameter values checked against the annotations of the function they are for.

    value_problem("inductoin", Sequence[Literal["previous_token", "induction"]])
    # "'inductoin' is not one of ['previous_token', 'induction']; did you mean 'induction'?"

Checked: ``Literal[...]`` choices, ``bool``, ``int``, ``float`` (an int is a float too), ``str``,
lists of those (``Sequence[X]``, ``list[X]``, ``tuple[X, ...]``) and unions of them. Any other
annotation (a class, a tensor, a tuple of fixed length) is left to the function itself, and so is
a union with such a member. This runs before any model loads, so a typo costs no weights.
"""

from __future__ import annotations

import collections.abc
import difflib
import types
import typing
from typing import Literal, Union

_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_LISTS = (list, tuple, collections.abc.Sequence)


def value_problem(value, annotation) -> str | None:
    """Why `value` (as read from TOML) does not fit `annotation`, in one phrase; None when it fits
    or when the annotation is not one checked here."""
    wanted = _describe(annotation)
    if wanted is None or _fits(value, annotation):
        return None
    if isinstance(value, list) and _item(annotation) is not None:
        bad = next(v for v in value if not _fits(v, _item(annotation)))
        return value_problem(bad, _item(annotation))
    close = difflib.get_close_matches(value, _choices(annotation), n=1) if isinstance(value, str) else []
    return f"{value!r} is not {wanted}" + (f"; did you mean {close[0]!r}?" if close else "")


def _describe(annotation) -> str | None:
    """What `annotation` asks for, in words (None: not checked here)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return None if None in parts else " or ".join(dict.fromkeys(parts))
    item = _item(annotation)
    if item is not None:
        inner = _describe(item)
        return None if inner is None else f"a list, each {inner}"
    return _SCALARS.get(annotation)


def _fits(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))
    item = _item(annotation)
    if item is not None:
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _item(annotation):
    """The item type of a list annotation (``Sequence[X]``, ``list[X]``, ``tuple[X, ...]``), else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin not in _LISTS or not args:
        return None
    if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
        return None
    return args[0]


def _choices(annotation) -> list[str]:
    """Every string choice of the Literals inside `annotation` (for "did you mean")."""
    if typing.get_origin(annotation) is Literal:
        return [a for a in typing.get_args(annotation) if isinstance(a, str)]
    return [c for a in typing.get_args(annotation) for c in _choices(a)]
