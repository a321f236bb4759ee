"""Closing the loop: reviewed log records become probe-training rows; a retrained probe goes into a policy.

The loop: a monitor fires on live traffic (in ``shadow`` while it is on trial) and the log keeps
what it flagged; a reviewer labels the record ``true_positive`` or ``false_positive``
(:meth:`guard.logstore.LogStore.label`); :func:`export_labelled` turns the labelled records into
rows of the probe-training format; ``guard probe train --data ORIGINAL --data REVIEWED`` fits a new
probe; ``guard probe eval --probe OLD --probe NEW --data REVIEWED`` compares them on the reviewed
rows; :func:`promote_probe` writes the new probe into the policy file, which a running server
hot-reloads.

Exported rows are what the monitor flagged, labelled by the reviewer's verdict: 1 when the record
is a ``true_positive`` (the monitor was right), 0 when it is a ``false_positive``. ``unsure`` and
unlabelled records give no rows. The format is that of :mod:`guard.probe.data`::

    {"prompt": str, "completion": str, "label": 0 | 1,          # what training reads
     "messages": [...], "raw_prompt": true, "context": str,      # only where needed (see below)
     "category": "reviewed", "split": "reviewed", "source": "review",
     "log_id": str, "monitor": str, "reviewer": str, "review_label": str, "note": str,
     "kind": "span" | "answer" | "prompt", "attempt": int}

- ``kind: span``: a discarded span (the text from the rollback point on) in which the monitor
  fired: what an acting monitor condemned. ``kind: answer``: the final answer, when the monitor
  fired in it (or on the stop token that ended it) and nothing was cut (a ``shadow`` monitor).
  Both are output-scope rows.
- ``kind: prompt`` (``scope="prompt"`` only): the prompt a prompt-scope monitor fired on; its
  ``completion`` is the final answer (never scored by ``--span prompt`` training).
- The rows reproduce the token sequence the monitor read: ``prompt`` is the last user message;
  ``messages`` is the whole chat when it was more than one user message; ``raw_prompt`` marks a
  ``/v1/completions`` text prompt (no chat template); ``context`` is the answer text before the
  completion in its attempt (the reasoning section of a deliberating answer, and the kept answer
  before a mid-answer rollback point). A unit whose context the record cannot reproduce is
  skipped with a warning: a token-id prompt, a reasoning section opened mid-generation (``retry``,
  ``model``), an answer prefix without a ``tokenizer`` to decode it, or one a refusal dropped.
  A system message the policy itself adds (deliberation ``placement: system``) is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import yaml

from guard.controller.record import Firing, GenerationRecord
from guard.errors import InvalidRequestError, ModelLoadError, PolicyError
from guard.monitors.probe import ProbeMonitor, config_fingerprint
from guard.policy import load_policy
from guard.policy.build import aggregation
from guard.policy.schema import ProbeMonitorSpec

log = logging.getLogger(__name__)

REVIEWED_LABELS = {"true_positive": 1, "false_positive": 0}
"""Reviewer verdict -> probe label of what the monitor flagged; other verdicts give no rows."""
_PAGE = 500


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


# -- export ----------------------------------------------------------------------------------------


def export_labelled(
    store,
    *,
    policy: str | None = None,
    monitor: str | None = None,
    since: float | datetime | None = None,
    until: float | datetime | None = None,
    scope: Literal["output", "prompt"] = "output",
    tokenizer: Decoder | None = None,
) -> list[dict]:
    """Probe-training rows from every record labelled true/false positive, oldest record first.

    ``policy`` (policy name), ``monitor``, ``since`` and ``until`` filter the records as
    :meth:`LogStore.list` does; ``monitor`` also keeps only what that monitor flagged. ``scope``
    picks output rows (spans and answers, for an output probe) or prompt rows (for a prompt-scope
    probe). ``tokenizer`` (anything with ``decode(ids)``) lets rows after a mid-answer rollback
    point carry their ``context``; without it those rows are skipped. See the module docstring.
    """
    if scope not in ("output", "prompt"):
        raise InvalidRequestError(f"scope must be output or prompt, got {scope!r}", param="scope")
    rows: list[dict] = []
    for log_id in _labelled_ids(store, policy=policy, monitor=monitor, since=since, until=until):
        review = store.labels(log_id)[-1]
        if review.label in REVIEWED_LABELS:
            rows += record_rows(
                store.get(log_id), log_id, review, monitor=monitor, scope=scope, tokenizer=tokenizer
            )
    return rows


def _labelled_ids(store, **filters) -> list[str]:
    """Ids of records whose current label is a reviewed verdict, oldest first."""
    found: dict[str, float] = {}
    for label in REVIEWED_LABELS:
        offset = 0
        while True:
            page = store.list(label=label, limit=_PAGE, offset=offset, **filters)
            found.update((s.id, s.created) for s in page)
            if len(page) < _PAGE:
                break
            offset += _PAGE
    return sorted(found, key=lambda i: (found[i], i))


def record_rows(
    record: GenerationRecord,
    log_id: str,
    review,
    *,
    monitor: str | None = None,
    scope: Literal["output", "prompt"] = "output",
    tokenizer: Decoder | None = None,
) -> list[dict]:
    """The rows of one labelled record (``review``: its current :class:`guard.logstore.Label`)."""
    conversation = _conversation(record)
    if conversation is None:
        log.warning(
            "log %s: the prompt was token ids, which a text row cannot reproduce; skipped", log_id
        )
        return []
    label = REVIEWED_LABELS[review.label]
    provenance = {
        "category": "reviewed",
        "split": "reviewed",
        "source": "review",
        "log_id": log_id,
        "reviewer": review.reviewer,
        "review_label": review.label,
        "note": review.note or "",
    }
    fired = [
        f for f in record.firings if f.scope == scope and (monitor is None or f.monitor == monitor)
    ]
    units = (
        _prompt_units(record, fired)
        if scope == "prompt"
        else _output_units(record, fired, log_id, tokenizer)
    )
    return [
        {
            "prompt": conversation["prompt"],
            "completion": u["completion"],
            "label": label,
            **{k: v for k, v in conversation.items() if k != "prompt"},
            **({"context": u["context"]} if u.get("context") else {}),
            **provenance,
            "monitor": u["monitor"],
            "kind": u["kind"],
            "attempt": u["attempt"],
        }
        for u in units
        if u["completion"]
    ]  # a span of special tokens only has no text to score


def _conversation(record: GenerationRecord) -> dict[str, Any] | None:
    """``prompt`` plus ``messages`` / ``raw_prompt`` as the row format needs them; None for token ids."""
    if record.messages is not None:
        msgs = [{"role": m["role"], "content": _content(m.get("content"))} for m in record.messages]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        out: dict[str, Any] = {"prompt": users[-1] if users else msgs[-1]["content"]}
        if [m["role"] for m in msgs] != ["user"]:
            out["messages"] = msgs
        return out
    if record.prompt is not None:
        return {"prompt": record.prompt, "raw_prompt": True}
    return None


def _content(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def _prompt_units(record: GenerationRecord, fired: list[Firing]) -> list[dict]:
    if not fired:
        return []
    return [
        {
            "completion": record.final_text,
            "monitor": fired[0].monitor,
            "kind": "prompt",
            "attempt": 0,
        }
    ]


def _output_units(
    record: GenerationRecord, fired: list[Firing], log_id: str, tokenizer: Decoder | None
) -> list[dict]:
    """Each span or final answer holding an output firing, once, with its context."""
    final_attempt = len(record.retries)
    groups: dict[int | str, list[Firing]] = {}
    for f in fired:
        key = _unit_of(record, f, final_attempt)
        if key is not None:
            groups.setdefault(key, []).append(f)
    reasoning, prefixes = _reasoning_context(record), _span_prefixes(record)
    units = []
    for key, firings in groups.items():
        what = "answer" if key == "answer" else f"span {key}"
        prefix, text = (
            ([], record.final_text)
            if isinstance(key, str)
            else (prefixes[key], record.spans[key].text)
        )
        problem = (
            "reasoning opened mid-generation"
            if reasoning is None
            else "answer prefix not recorded"
            if prefix is None
            else "no tokenizer to decode its prefix"
            if prefix and tokenizer is None
            else None
        )
        if problem:
            log.warning(
                "log %s: the context of the %s the monitor flagged is not reproducible from the record "
                "(%s); skipped",
                log_id,
                what,
                problem,
            )
            continue
        assert reasoning is not None  # else a problem above
        names = [f.monitor for f in firings]
        # the monitor that condemned a span, when it is one of those exported
        name = (
            record.spans[key].monitor
            if isinstance(key, int) and record.spans[key].monitor in names
            else names[0]
        )
        decoded = tokenizer.decode(prefix) if prefix and tokenizer is not None else ""
        units.append(
            {
                "completion": text,
                "context": reasoning + decoded,
                "monitor": name,
                "kind": "answer" if key == "answer" else "span",
                "attempt": firings[0].attempt,
            }
        )
    return units


def _unit_of(record: GenerationRecord, firing: Firing, final_attempt: int):
    """Index of the span holding an output firing, ``"answer"`` for the final answer, else None."""
    pos = firing.position
    attempt = firing.attempt
    for i, s in enumerate(record.spans):
        if s.attempt == attempt and s.start <= pos < s.start + len(s.token_ids):
            return i
    # the stop token that ended the answer is scored but not part of output_ids
    end = len(record.output_ids) + (record.finish_reason == "stop")
    if attempt == final_attempt and record.outcome != "refused" and pos < end:
        return "answer"
    return None


def _reasoning_context(record: GenerationRecord) -> str | None:
    """Reasoning text every attempt's answer followed ('' without one); None if some attempts did not."""
    if not record.reasoning:
        return ""
    return record.reasoning if record.deliberation in ("always", "on_risk") else None


def _span_prefixes(record: GenerationRecord) -> list[list[int] | None]:
    """Per span, the answer ids before its rollback point in its attempt (None: not recorded).

    Undoes the rollbacks from the last: just before span j was cut, the output was the output after
    it cut to ``start_j``, plus the span. A refusal drops the output it ends, so after a refused
    answer only spans starting at 0 have a known prefix.
    """
    state = None if record.outcome == "refused" else list(record.output_ids)
    out: list[list[int] | None] = [None] * len(record.spans)
    for j in range(len(record.spans) - 1, -1, -1):
        span = record.spans[j]
        prefix = (
            []
            if span.start == 0
            else (state[: span.start] if state is not None and len(state) >= span.start else None)
        )
        out[j] = prefix
        state = None if prefix is None else prefix + list(span.token_ids)
    return out


def write_jsonl(rows: Iterable[dict], out: str | Path | IO[str]) -> int:
    """Write ``rows`` as JSONL to a path or an open text file; return how many."""
    if isinstance(out, (str, Path)):
        with Path(out).open("w", encoding="utf-8") as fh:
            return write_jsonl(rows, fh)
    n = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n


# -- promotion -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote_probe` wrote."""

    policy_file: Path
    monitor: str
    path: str
    """The probe path as written in the policy."""
    threshold: float | None
    """The threshold written into the policy; ``None``: the policy sets none, the probe file's applies."""
    effective_threshold: float
    """The threshold the monitor now fires above."""
    policy_hash: str
    """sha256 of the new file's bytes (the ``policy_hash`` of /health and of new log records)."""
    warnings: tuple[str, ...] = ()
    action: str = "backtrack"
    """The monitor's action in the new policy."""


def promote_probe(
    probe_dir: str | Path,
    policy_file: str | Path,
    monitor: str,
    *,
    threshold: float | None = None,
    action: str | None = None,
) -> Promotion:
    """Point probe monitor ``monitor`` of ``policy_file`` at ``probe_dir``, in place.

    Only the monitor's ``path`` value changes, and its ``threshold``: a threshold the policy sets is
    replaced by the new probe's (it was calibrated for the old one); ``threshold`` pins a value,
    added if the policy sets none. ``action`` (e.g. ``backtrack`` for a monitor reviewed in
    ``shadow``) sets the monitor's action too. Comments and formatting elsewhere are untouched. The new text
    is validated as ``guard serve`` would load it (policy loader, then the probe with the policy's
    overrides) and only then moved over the file with ``os.replace``, so a hot-reload watcher sees
    the old file or the new one, never a half-written or invalid one. Raises
    :class:`~guard.errors.PolicyError` (file untouched) if the result would not load.
    """
    policy_file = Path(policy_file)
    text = policy_file.read_text(encoding="utf-8")
    probe = ProbeMonitor.load(probe_dir, name=monitor)
    node, fields = _monitor_node(policy_file, text, monitor)
    path_node = fields["path"][1]
    path = _probe_path(policy_file, probe_dir, path_node.value)
    edits = [(path_node.start_mark.index, path_node.end_mark.index, _yaml_scalar(path))]
    written = (
        threshold if threshold is not None else (probe.threshold if "threshold" in fields else None)
    )
    if "threshold" in fields:
        value = fields["threshold"][1]
        assert written is not None  # the probe's threshold, when the call gave none
        edits.append((value.start_mark.index, value.end_mark.index, repr(float(written))))
    elif written is not None:
        edits.append(_insertion(text, node, fields, f"threshold: {float(written)!r}"))
    if action is not None and action != (
        fields["action"][1].value if "action" in fields else "backtrack"
    ):
        if "action" in fields:
            value = fields["action"][1]
            edits.append((value.start_mark.index, value.end_mark.index, _yaml_scalar(action)))
        else:
            edits.append(_insertion(text, node, fields, f"action: {_yaml_scalar(action)}"))
    new_text = text
    # from the end, so earlier offsets stay valid; of two insertions at one place, the first stays first
    for _, (start, end, replacement) in sorted(
        enumerate(edits), key=lambda e: (e[1][0], e[0]), reverse=True
    ):
        new_text = new_text[:start] + replacement + new_text[end:]
    spec, warnings = _write_validated(policy_file, new_text, monitor, probe)
    return Promotion(
        policy_file,
        monitor,
        path,
        written,
        probe.threshold if written is None else float(written),
        hashlib.sha256(new_text.encode("utf-8")).hexdigest(),
        tuple(warnings),
        spec.action,
    )


def _monitor_node(
    policy_file: Path, text: str, monitor: str
) -> tuple[yaml.MappingNode, dict[str, tuple[yaml.Node, yaml.Node]]]:
    """The mapping of the probe monitor called ``monitor`` in the YAML text, and its key -> (key
    node, value node)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise PolicyError(str(policy_file), [f"{policy_file}: not valid YAML: {exc}"]) from None
    monitors = _get(root, "monitors")
    for item in monitors.value if isinstance(monitors, yaml.SequenceNode) else []:
        if isinstance(item, yaml.MappingNode):
            fields: dict[str, tuple[yaml.Node, yaml.Node]] = {
                k.value: (k, v) for k, v in item.value if isinstance(k, yaml.ScalarNode)
            }
            if "name" in fields and fields["name"][1].value == monitor:
                if (
                    "kind" not in fields
                    or fields["kind"][1].value != "probe"
                    or "path" not in fields
                ):
                    raise PolicyError(
                        str(policy_file),
                        [
                            (
                                f"{policy_file}: monitor '{monitor}' is not a probe "
                                "monitor with a path"
                            )
                        ],
                    )
                return item, fields
    raise PolicyError(str(policy_file), [f"{policy_file}: no monitor named '{monitor}'"])


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _insertion(
    text: str, node: yaml.MappingNode, fields: dict[str, tuple[yaml.Node, yaml.Node]], entry: str
) -> tuple[int, int, str]:
    """Where and how to add ``entry`` (``key: value``) to the monitor's mapping, in its own style:
    after the last value of a flow mapping ``{...}``, else on a line of its own after ``path``."""
    if node.flow_style:
        end = max(v.end_mark.index for _, v in fields.values())
        return end, end, f", {entry}"
    key, value = fields["path"]
    eol = text.find("\n", value.end_mark.index)
    eol = len(text) if eol < 0 else eol
    return eol, eol, "\n" + " " * key.start_mark.column + entry


def _probe_path(policy_file: Path, probe_dir: str | Path, current: str) -> str:
    """The probe path to write: absolute if the policy's was, else relative to the policy's directory."""
    probe = Path(probe_dir).resolve()
    if Path(current).is_absolute():
        return str(probe)
    return os.path.relpath(probe, policy_file.resolve().parent)


def _yaml_scalar(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_./+-]*", value) or re.fullmatch(
        r"/[A-Za-z0-9_./+-]*", value
    ):
        return value
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def _write_validated(
    policy_file: Path, new_text: str, monitor: str, probe
) -> tuple[Any, list[str]]:
    """Validate ``new_text`` as the policy, then atomically replace the file; return the monitor's
    validated spec and warnings."""
    fd, tmp = tempfile.mkstemp(
        dir=policy_file.parent, prefix=f".{policy_file.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        try:
            policy = load_policy(tmp)
            spec = policy.monitor(monitor)
            if not isinstance(spec, ProbeMonitorSpec):  # _monitor_node found a probe's path
                raise PolicyError(str(policy_file), [f"monitor '{monitor}' is not a probe"])
            agg = aggregation(spec.aggregation)
            ProbeMonitor.load(
                spec.path, name=monitor, layer=spec.layer, threshold=spec.threshold, aggregation=agg
            )
        except PolicyError as exc:
            raise PolicyError(
                str(policy_file), [e.replace(tmp, str(policy_file)) for e in exc.errors]
            ) from None
        except ModelLoadError as exc:
            raise PolicyError(str(policy_file), [f"monitor '{monitor}': {exc}"]) from None
        warnings = []
        if agg is not None and agg != probe.aggregation:
            warnings.append(
                f"the policy overrides the aggregation of '{monitor}' ({agg.kind}); the probe's "
                f"threshold was calibrated for {probe.aggregation.kind}"
            )
        trained = (probe.meta.get("model") or {}).get("config_sha256")
        if trained and config_fingerprint(policy.model.path) not in (None, trained):
            warnings.append(
                f"the probe was trained on a model whose config.json differs from {policy.model.path}"
            )
        os.chmod(tmp, os.stat(policy_file).st_mode & 0o7777)
        os.replace(tmp, policy_file)
        return spec, warnings
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
