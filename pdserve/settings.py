"""Command-line flags generated from pydantic settings models.

Each component declares its settings once, as a pydantic model whose field descriptions are
the documentation. This module turns such a model into argparse flags and back, so flags,
defaults, validation and ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
import warnings
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

M = TypeVar("M", bound=BaseModel)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new one's field and warns once."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str, **kwargs: Any):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        warnings.warn(
            f"{option} is deprecated; use {self.replacement}", DeprecationWarning, stacklevel=2
        )
        print(f"pdserve: {option} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    exclude: typing.Collection[str] = (),
    prefix: str = "",
) -> None:
    """Adds one flag per field; an absent flag leaves the model's default in charge.

    A field that is itself a settings model contributes its fields under the field's name
    (``kv: KVTransferSettings`` gives ``--kv-lease-s``, stored as ``kv_lease_s``). ``exclude``
    names those flat names. A field may list old spellings in
    ``json_schema_extra={"deprecated_flags": [...]}``: they still work, and warn.
    """
    for name, field in model.model_fields.items():
        dest = prefix + name
        if dest in exclude:
            continue
        annotation = _unwrap_optional(field.annotation)
        if _is_model(annotation):
            add_arguments(parser, annotation, exclude, prefix=dest + "_")
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        default = field.default
        shown = "" if default is PydanticUndefined or default is None else f" (default: {default})"
        kwargs["help"] = (field.description or "") + shown
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
            kwargs["type"] = type(get_args(annotation)[0])
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
            kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[annotation]
        else:
            raise TypeError(f"no command-line form for {dest}: {field.annotation}")
        if default is PydanticUndefined:
            kwargs["required"] = True
        parser.add_argument(_flag(dest), **kwargs)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        for old in typing.cast(list[str], extra.get("deprecated_flags", [])):
            alias: dict[str, Any] = {"type": kwargs["type"]} if "type" in kwargs else {}
            parser.add_argument(
                old,
                dest=dest,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
                action=_DeprecatedAlias,
                replacement=_flag(dest),
                **alias,
            )


def _values(model: type[BaseModel], flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        if _is_model(annotation):
            nested = _values(annotation, flat, prefix + name + "_")
            if nested:
                values[name] = nested
        elif prefix + name in flat:
            values[name] = flat[prefix + name]
    return values


def from_args(model: type[M], namespace: argparse.Namespace, **overrides: Any) -> M:
    values = _values(model, vars(namespace), "")
    values.update(overrides)
    return model.model_validate(values)


def to_argv(
    settings: BaseModel, exclude: typing.Collection[str] = (), prefix: str = ""
) -> list[str]:
    """The flags that reproduce ``settings`` (only fields that differ from the defaults)."""
    argv: list[str] = []
    for name, field in type(settings).model_fields.items():
        dest = prefix + name
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            argv += to_argv(value, exclude, prefix=dest + "_")
            continue
        if dest in exclude or (field.default is not PydanticUndefined and value == field.default):
            continue
        if isinstance(value, bool):
            argv.append(_flag(dest) if value else "--no-" + dest.replace("_", "-"))
        elif value is not None:
            argv += [_flag(dest), str(value)]
    return argv
