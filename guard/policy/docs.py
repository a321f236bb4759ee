"""The policy reference, rendered from the schema so that it is never written twice.

:func:`render_docs` walks :class:`~guard.policy.schema.Policy` breadth first and writes one
markdown section per model: its docstring, then a table of its fields with type (allowed values
and bounds included), default and description. ``guard policy docs --out docs/policy.md``
writes it; a test fails when the committed file differs from what the schema renders.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from guard.policy.schema import Policy

HEADER = """\
# Policy file reference

<!-- Generated from guard/policy/schema.py by `guard policy docs --out docs/policy.md`; do not edit.
     tests/test_policy_docs.py fails when this file is stale. -->

A policy is one YAML file: the model to serve and how to guard it. Unknown fields are errors, and
`guard policy check FILE...` reports every problem at once as `file:line:col: field: message`.
Relative paths resolve against the policy file's directory. Examples: `policies/`.
"""

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
_BOUNDS = (
    ("ge", "≥"),
    ("gt", ">"),
    ("le", "≤"),
    ("lt", "<"),
    ("min_length", "min length"),
    ("max_length", "max length"),
    ("pattern", "pattern"),
)


def render_docs() -> str:
    """The markdown reference for the whole policy schema."""
    sections = [HEADER]
    for model, where in _models_in_order():
        sections.append(_section(model, where))
    return "\n".join(sections)


def _models_in_order() -> list[tuple[type[BaseModel], str]]:
    """Every model reachable from Policy, breadth first, with the field path where it appears."""
    found: list[tuple[type[BaseModel], str]] = [(Policy, "the file itself")]
    seen: set[type[BaseModel]] = {Policy}
    i = 0
    while i < len(found):
        model, where = found[i]
        base = "" if model is Policy else where.split(" ")[0].strip("`")
        for name, field in model.model_fields.items():
            path = f"{base}.{name}" if base else name
            for sub in _nested_models(field.annotation):
                if sub not in seen:
                    seen.add(sub)
                    suffix = "[]" if _is_list(field.annotation) else ""
                    tag = _tag(sub)
                    found.append(
                        (sub, f"`{path}{suffix}`" + (f" with `kind: {tag}`" if tag else ""))
                    )
        i += 1
    return found


def _section(model: type[BaseModel], where: str) -> str:
    doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
    rest = [" ".join(p.split()) for p in (model.__doc__ or "").split("\n\n")[1:] if p.strip()]
    lines = [f"## {model.__name__}", "", doc, ""]
    lines += [p + "\n" for p in rest]
    lines += [
        f"Appears at: {where}.",
        "",
        "| Field | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        lines.append(
            f"| `{name}` | {_cell(_field_type(field))} | {_cell(_default(field))} | "
            f"{_cell(field.description or '')} |"
        )
    return "\n".join(lines) + "\n"


def _field_type(field: FieldInfo) -> str:
    text = _type(field.annotation)
    bounds = [
        f"{label} {_value(getattr(m, attr))}"
        for m in field.metadata
        for attr, label in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        values = ", ".join(f"`{_value(a)}`" for a in args)
        return values if len(args) == 1 else f"one of {values}"
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in members)
        return text + (" or `null`" if len(members) < len(args) else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.get_default(call_default_factory=True)
        return "`{}` (every field at its default)" if value == {} else f"`{_value(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{_value(field.default)}`"


def _value(value: Any) -> str:
    """A default or bound as it would be written in YAML flow style (JSON is valid YAML)."""

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json", exclude_defaults=True)
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), ensure_ascii=False)


def _nested_models(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _nested_models(a)]


def _is_list(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Annotated:
        return _is_list(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is list


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if len(args) == 1 and field.default is PydanticUndefined else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
