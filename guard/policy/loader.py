"""Load a policy file, reporting every problem at once as ``file:line:col: field.path: message``.

The YAML is composed into a node tree (which keeps line and column of every value), constructed
into plain data and validated by :class:`~guard.policy.schema.Policy`. Each pydantic error's
``loc`` is walked along the node tree to find where the offending value (or, for an unknown
field, key) sits in the file. Errors come out sorted by position.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from guard.errors import PolicyError
from guard.policy.cross import CROSS_FIELD, cross_field_errors
from guard.policy.schema import Policy

Loc = tuple[int | str, ...]


def load_policy(path: str | Path, *, check_paths: bool = True) -> Policy:
    """Read, validate and resolve the policy at ``path``.

    Relative paths in the file resolve against its directory. With ``check_paths`` the model
    directory (engine transformers) and probe directories must exist. Raises
    :class:`~guard.errors.PolicyError` listing every problem.
    """
    path = Path(path)
    raw = read_policy_bytes(path)
    text = _decode(path, raw)
    node, data = _parse(path, text)
    if not isinstance(data, dict) or node is None:
        where = _position(path, node)
        raise PolicyError(
            str(path),
            [f"{where}: <root>: the policy must be a mapping with at least name and model"],
        )
    context = {"base_dir": path.parent.resolve(), "check_paths": check_paths}
    try:
        policy = Policy.model_validate(data, context=context)
    except ValidationError as e:
        raise PolicyError(
            str(path), _format_errors(path, node, e, cross_field_errors(data))
        ) from None
    policy._content_hash = hashlib.sha256(raw).hexdigest()
    # Absolute, symlinks kept: a Kubernetes ConfigMap mount updates a file by swapping the symlink
    # behind its name (and deleting the old target), so hot reload must re-read the name.
    policy._source_path = Path(os.path.abspath(path))
    return policy


def format_policy(policy: Policy) -> str:
    """The resolved policy as YAML (defaults filled in, paths absolute), headed by source and hash.
    A password in ``log.url`` is shown as ``***``; literal API keys are shown as they are written."""
    data = policy.model_dump(mode="json")
    log = data.get("log") or {}
    if log.get("url"):
        from sqlalchemy.engine import make_url

        log["url"] = make_url(log["url"]).render_as_string(hide_password=True)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    head = f"# source: {policy.source_path}\n" if policy.source_path else ""
    return f"{head}# sha256: {policy.content_hash}\n{body}"


MAX_POLICY_BYTES = 1024 * 1024
"""A policy file is a few kilobytes; anything near this is a mistake or an attack."""


def read_policy_bytes(path: Path) -> bytes:
    """The file's bytes: a regular file of at most :data:`MAX_POLICY_BYTES` (never a device or FIFO,
    which could block or never end)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(str(path), [f"{path}: a policy must be a regular file"])
        if st.st_size > MAX_POLICY_BYTES:
            raise PolicyError(
                str(path),
                [
                    (
                        f"{path}: the policy file is {st.st_size} bytes; at most "
                        f"{MAX_POLICY_BYTES} are allowed"
                    )
                ],
            )
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(
            str(path), [f"{path}: cannot read policy file: {e.strerror or e}"]
        ) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            str(path), [f"{path}: the policy file is larger than {MAX_POLICY_BYTES} bytes"]
        )
    return raw


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text without NUL or other characters YAML refuses; else ``file:line:col`` of the first bad byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(raw[: e.start].decode("utf-8", errors="replace"))
        raise PolicyError(
            str(path),
            [
                (
                    f"{path}:{line}:{col}: invalid UTF-8 byte 0x{raw[e.start]:02x}; a policy "
                    "must be UTF-8 text"
                )
            ],
        ) from None
    bad = _UNPRINTABLE.search(text)
    if bad is not None:
        line, col = _line_col(text[: bad.start()])
        raise PolicyError(
            str(path),
            [
                (
                    f"{path}:{line}:{col}: character U+{ord(bad.group()):04X} is not allowed in "
                    "a policy (YAML text must be printable)"
                )
            ],
        )
    return text


# What YAML's reader refuses (it allows tab, LF, CR, printable ASCII, NEL and printable Unicode).
_UNPRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _line_col(before: str) -> tuple[int, int]:
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader without aliases: ``*name`` is refused where it appears, so no document can expand
    (a "billion laughs" alias bomb is an error in microseconds, not minutes of CPU)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in a policy; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct the YAML; syntax errors and duplicate keys become PolicyError."""
    loader = _PolicyLoader(text)
    try:
        node = loader.get_single_node()
        errors = _duplicate_keys(path, node) if node is not None else []
        if errors:
            raise PolicyError(str(path), errors)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise PolicyError(str(path), [f"{where}: YAML syntax: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise PolicyError(str(path), [f"{path}: YAML syntax: {e}"]) from None
    finally:
        loader.dispose()
    return node, data


def _duplicate_keys(path: Path, node: yaml.Node, trail: Loc = ()) -> list[str]:
    """PyYAML keeps the last of two equal keys silently; a policy must not."""
    errors: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            if name in seen:
                errors.append(
                    f"{_position(path, key)}: {_dotted((*trail, name))}: duplicate key '{name}'"
                )
            seen.add(name)
            errors += _duplicate_keys(path, value, (*trail, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _duplicate_keys(path, item, (*trail, i))
    return errors


def _format_errors(
    path: Path, root: yaml.Node, error: ValidationError, cross: Sequence[tuple[Loc, str]] = ()
) -> list[str]:
    """Every error as ``file:line:col: field: message``, sorted by position. ``cross``: the policy's
    cross-section errors, added when field errors kept the policy's own check from running."""
    lines: list[tuple[tuple[int, int], str]] = []
    if not any(err["type"] == CROSS_FIELD for err in error.errors()):
        for loc, message in cross:
            node, _, trail = _locate(root, loc)
            mark = node.start_mark
            lines.append(
                (
                    (mark.line, mark.column),
                    (f"{path}:{mark.line + 1}:{mark.column + 1}: {_dotted(trail)}: {message}"),
                )
            )
    for err in error.errors():
        loc = tuple(err["loc"]) + tuple(err.get("ctx", {}).get("loc_suffix", ()))
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc += ("kind",)
        node, key, trail = _locate(root, loc)
        # An unknown field is best shown at its key; anything else at the offending value.
        mark = (key if err["type"] == "extra_forbidden" and key is not None else node).start_mark
        message = _message(err, loc, trail)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        lines.append(((mark.line, mark.column), f"{where}: {_dotted(trail)}: {message}"))
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def _locate(root: yaml.Node, loc: Loc) -> tuple[yaml.Node, yaml.Node | None, Loc]:
    """Follow ``loc`` down the node tree: the deepest node reached, its key node, the field path.

    Elements that name no key are skipped when they are the discriminator tag of the current
    mapping (pydantic puts the tag value in the loc); any other unmatched element is a missing
    field: it and the rest stay in the path while the position stays at its parent.
    """
    node: yaml.Node = root
    key: yaml.Node | None = None
    trail: list[int | str] = []
    for i, part in enumerate(loc):
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node, key = node.value[part], None
            trail.append(part)
            continue
        if isinstance(node, yaml.MappingNode):
            pairs = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
            if isinstance(part, str) and part in pairs:
                key, node = pairs[part]
                trail.append(part)
                continue
            tag = pairs.get("kind", (None, None))[1]
            if isinstance(tag, yaml.ScalarNode) and tag.value == part:
                continue
        trail += loc[i:]
        break
    return node, key, tuple(trail)


def _message(err: ErrorDetails, loc: Loc, trail: Loc) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_fields(loc[:-1]))
        return f"unknown field '{trail[-1]}'; allowed fields: {allowed}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"invalid value {err['input']!r}; allowed values: {ctx['expected']}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        got = (
            f"invalid value {ctx['tag']!r}"
            if kind == "union_tag_invalid"
            else "required field is missing"
        )
        return f"{got}; allowed values: {_allowed_tags(loc[:-1])}"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} must match {ctx['pattern']}"
    if (
        kind == "value_error" and "error" in ctx
    ):  # a validator's ValueError: its own words, no "Value error,"
        return str(ctx["error"])
    msg = err["msg"]
    # pydantic's "Input should ..." reads better as "input should ...", but keep acronyms ("SAE").
    return msg if not msg or msg[:2].isupper() else msg[0].lower() + msg[1:]


def _model_at(loc: Loc) -> Any:
    """The schema type at a pydantic ``loc`` (discriminator tags pick the union member)."""
    current: Any = Policy
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif _is_model(current) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            member = {_tag(m): m for m in typing.get_args(current)}.get(part)
            if member is None:
                return None
            current = member
    return _unwrap(current)


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None``."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _unwrap(args[0])
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tag(member: Any) -> str | None:
    """The ``kind`` literal of a discriminated-union member."""
    if _is_model(member) and "kind" in member.model_fields:
        return typing.get_args(member.model_fields["kind"].annotation)[0]
    return None


def _allowed_fields(loc: Loc) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if _is_model(model) else []


def _allowed_tags(loc: Loc) -> str:
    return ", ".join(repr(_tag(m)) for m in typing.get_args(_model_at(loc)) if _tag(m))


def _position(path: Path, node: yaml.Node | None) -> str:
    if node is None:
        return f"{path}:1:1"
    return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _dotted(trail: Loc) -> str:
    out = ""
    for part in trail:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"
