"""A user factory's keyword arguments from a spec
(``package.module:factory:key=value,...``), each read as the type the
factory declares for it."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union


def parse_value(v: str) -> Any:
    """A value whose type nothing declares: a number if it reads as one,
    true/false/none as such, else the text."""
    for convert in (int, float):
        try:
            return convert(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_DESCRIBE = {bool: "a bool (true or false)", int: "an int (a whole number)", float: "a float (a number)",
             str: "a str", type(None): "None (none)"}


def _as(text: str, kind: Any) -> Any:
    """``text`` read as ``kind`` (bool, int, float, str, None, a Literal's
    values); ValueError when it is not one."""
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif kind is int:
        return int(text)
    elif kind is float:
        return float(text)
    elif kind is str:
        return text
    elif kind is type(None):
        if text.lower() == "none":
            return None
    elif typing.get_origin(kind) is Literal:
        for v in typing.get_args(kind):
            if str(v) == text:
                return v
    raise ValueError(text)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    return _DESCRIBE.get(kind, getattr(kind, "__name__", str(kind)))


def _alternatives(annotation: Any) -> tuple[Any, ...] | None:
    """The types a value may take, in the order to try them (None first,
    then bool before int before float before str: "1" is an int where both
    are allowed); None when the annotation is not one that text can be read
    as (a tensor, a callable...)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        kinds = typing.get_args(annotation)
    else:
        kinds = (annotation,)
    order = [type(None), bool, int, float, str]
    if not all(k in order or typing.get_origin(k) is Literal for k in kinds):
        return None
    return tuple(sorted(kinds, key=lambda k: order.index(k) if k in order else -1))


def _declared_types(fn: Callable[..., Any]) -> tuple[dict[str, Any], set[str] | None]:
    """Each parameter's declared type (its annotation, else its default's
    type) and the names the factory accepts (None when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return {}, None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: use the default values' types
        hints = {}
    types_: dict[str, Any] = {}
    names: set[str] | None = set()
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            names = None
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        if names is not None:
            names.add(name)
        if name in hints:
            types_[name] = hints[name]
        elif p.default is not p.empty and p.default is not None:
            types_[name] = type(p.default)
    return types_, names


def factory_kwargs(fn: Callable[..., Any], arg_text: str, spec: str) -> dict[str, Any]:
    """``key=value,...`` of a user factory spec, each value read as the type
    the factory declares for it (annotation, else default value): bool from
    true/false (yes/no, on/off, 1/0), int, float, str, None from none,
    ``Literal`` values, and unions of these.  Undeclared values are read as
    numbers, true/false/none or text.  A ValueError names the key, the value
    and the expected type, or a key the factory does not take."""
    declared, accepted = _declared_types(fn)
    name = getattr(fn, "__name__", "the factory")
    kwargs: dict[str, Any] = {}
    for item in filter(None, arg_text.split(",")):
        k, sep, v = item.partition("=")
        if not sep or not k.isidentifier():
            raise ValueError(f"factory argument {item!r} in {spec!r} is not KEY=VALUE")
        if accepted is not None and k not in accepted:
            raise ValueError(f"{spec}: {name}() takes no argument {k!r}; it takes {sorted(accepted) or 'none'}")
        kinds = _alternatives(declared[k]) if k in declared else None
        if kinds is None:
            kwargs[k] = parse_value(v)
            continue
        for kind in kinds:
            try:
                kwargs[k] = _as(v, kind)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"{spec}: {k}={v!r} is not {' or '.join(_describe(t) for t in kinds)}, "
                             f"the type {name}() declares for {k!r}")
    return kwargs


def load_factory(spec: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``package.module:factory[:key=value,...]`` -> (the factory, its keyword
    arguments read by :func:`factory_kwargs`); the current directory is
    importable, as ``python -m`` would make it.  A ValueError says what is
    wrong with the spec."""
    import importlib
    import sys
    from pathlib import Path

    mod_name, _, rest = spec.partition(":")
    attr, _, arg_text = rest.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"a model factory is package.module:factory[:key=value,...], got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise ValueError(f"cannot import {mod_name!r} for {spec!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no callable {attr!r} (from {spec!r})")
    return fn, factory_kwargs(fn, arg_text, spec)
