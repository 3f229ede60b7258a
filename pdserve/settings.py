"""Command-line flags generated from pydantic settings models.

Each component declares its settings once, as a pydantic model whose field descriptions are
the documentation. This module turns such a model into argparse flags and back, so flags,
defaults, validation and ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import types
import typing
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


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    exclude: typing.Collection[str] = (),
) -> None:
    """Adds one flag per field; an absent flag leaves the model's default in charge."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        annotation = _unwrap_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
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
            raise TypeError(f"no command-line form for {name}: {field.annotation}")
        if default is PydanticUndefined:
            kwargs["required"] = True
        parser.add_argument(_flag(name), **kwargs)


def from_args(model: type[M], namespace: argparse.Namespace, **overrides: Any) -> M:
    values = {k: v for k, v in vars(namespace).items() if k in model.model_fields}
    values.update(overrides)
    return model.model_validate(values)


def to_argv(settings: BaseModel, exclude: typing.Collection[str] = ()) -> list[str]:
    """The flags that reproduce ``settings`` (only fields that differ from the defaults)."""
    argv: list[str] = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if name in exclude or (field.default is not PydanticUndefined and value == field.default):
            continue
        if isinstance(value, bool):
            argv.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [_flag(name), str(value)]
    return argv
