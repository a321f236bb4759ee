"""The review API: list, read, label and export flagged generations, under ``/v1/guard/review``.

Contract:

- Closed unless an admin key is configured (``GUARD_ADMIN_KEY``, :class:`server.app.ServerSettings`):
  the app includes this router (and the page, :mod:`server.review_page`) only then, so without one
  every path answers 404 exactly like an unknown URL. With one, every route needs
  ``Authorization: Bearer <admin key>`` (401 otherwise, compared in constant time); tenant and
  global API keys are not admin keys.
- Records live in one log store per distinct log database of the served policies
  (:meth:`guard.service.GuardService.log_stores`). The list merges them newest first; ids are
  unique across stores (time prefix and 80 random bits), so a record is found in the one store
  that holds it. A store that only a replaced policy version wrote to is not read.
- Handlers are plain ``def``: the stores block, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from guard.controller.events import LogOutcome
from guard.controller.record import GenerationRecord
from guard.errors import NotFoundError
from guard.logstore import LABELS, UNLABELLED, Label, LogStore, LogSummary
from guard.loop import export_labelled
from server.auth import admin_key_in_force, check_admin
from server.review_protocol import (
    OUTCOMES,
    LabelFilter,
    LabelRequest,
    LabelView,
    MonitorView,
    ReviewFilters,
    ReviewList,
    ReviewRecord,
    ReviewSummary,
)
from server.routes import ServiceDep

PREFIX = "/v1/guard/review"
MAX_PAGE = 500


@runtime_checkable
class ReviewSource(Protocol):
    """The part of ``guard.service.GuardService`` the review API reads."""

    def log_stores(self) -> list[LogStore]: ...

    def find_log(self, log_id: str) -> tuple[LogStore, str]: ...

    def monitor_thresholds(self, policy_name: str, policy_hash: str) -> dict[str, float]: ...

    def output_tokens(self, record: GenerationRecord) -> list[str] | None: ...


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminKey",
    description="The server's admin key (GUARD_ADMIN_KEY); API keys are not admin keys.",
)


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """404 unless an admin key is configured; 401 unless the request carries it as a bearer token."""
    admin_key = admin_key_in_force(request.app.state.settings.admin_key)
    if not admin_key:
        raise HTTPException(404)
    check_admin(
        credentials.credentials if credentials is not None else None, admin_key, "The review API"
    )


def get_source(service: ServiceDep) -> ReviewSource:
    if not isinstance(service, ReviewSource):
        raise NotFoundError("This server keeps no generation log.", code="log_not_found")
    return service


SourceDep = Annotated[ReviewSource, Depends(get_source)]


@dataclass(frozen=True)
class Filters:
    """List filters, as the log stores take them (``None``: any)."""

    policy: str | None = None
    outcome: str | None = None
    monitor: str | None = None
    since: float | None = None
    until: float | None = None
    label: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


_TIME = "Epoch seconds or ISO 8601 (without a zone: the server's local time)."


def get_filters(
    policy: Annotated[
        str | None, Query(description="Only records served under this policy name.")
    ] = None,
    outcome: Annotated[LogOutcome | None, Query(description="Only this outcome.")] = None,
    monitor: Annotated[
        str | None, Query(description="Only records where this monitor fired.")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="Only records created at or after this time. " + _TIME)
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Only records created before this time. " + _TIME)
    ] = None,
    label: Annotated[
        LabelFilter | None,
        Query(
            description="Only records whose latest label is this ('unlabelled': not reviewed yet)."
        ),
    ] = None,
) -> Filters:
    """The list filters of the query string (bad values: 400 through the request validation)."""
    return Filters(
        policy or None,
        outcome,
        monitor or None,
        since.timestamp() if since else None,
        until.timestamp() if until else None,
        label,
    )


FiltersDep = Annotated[Filters, Depends(get_filters)]

router = APIRouter(prefix=PREFIX, tags=["review"], dependencies=[Depends(require_admin)])


@router.get("/logs", response_model=ReviewList)
def list_logs(
    source: SourceDep,
    filters: FiltersDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ReviewList:
    """A page of logged generations, newest first, over every served log store."""
    rows, total = page(source.log_stores(), filters, limit, offset)
    return ReviewList(items=[_summary(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/logs/{log_id}", response_model=ReviewRecord)
def get_log(log_id: str, source: SourceDep) -> ReviewRecord:
    """One record (a unique id prefix is enough) with its labels and per-monitor facts."""
    store, full_id = source.find_log(log_id)
    record = store.get(full_id)
    thresholds = source.monitor_thresholds(record.policy_name, record.policy_hash)
    return ReviewRecord(
        id=full_id,
        record=record,
        output_tokens=source.output_tokens(record),
        monitors=monitor_views(record, thresholds),
        labels=[_label(x) for x in store.labels(full_id)],
    )


@router.post("/logs/{log_id}/labels", response_model=LabelView)
def label_log(log_id: str, body: LabelRequest, source: SourceDep) -> LabelView:
    """Store a reviewer's label on a record; returns it as stored (with its time)."""
    store, full_id = source.find_log(log_id)
    return _label(store.label(full_id, body.label, reviewer=body.reviewer.strip(), note=body.note))


@router.get("/filters", response_model=ReviewFilters)
def filter_values(source: SourceDep) -> ReviewFilters:
    """The policies and monitors that occur in the logs, and the outcomes and labels to filter by."""
    stores = source.log_stores()
    return ReviewFilters(
        policies=sorted({p for s in stores for p in s.policies()}),
        monitors=sorted({m for s in stores for m in s.monitors()}),
        outcomes=list(OUTCOMES),
        labels=[*LABELS, UNLABELLED],
    )


@router.get(
    "/export",
    response_class=Response,
    responses={
        200: {
            "description": "One JSON object per line: the labelled records as probe-training rows (guard.loop).",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
def export_labels(source: SourceDep, filters: FiltersDep) -> Response:
    """Labelled records as probe-training rows (JSON lines); the label filter does not apply."""
    kwargs = {
        k: v for k, v in filters.kwargs().items() if k in ("policy", "monitor", "since", "until")
    }
    rows = [row for store in source.log_stores() for row in export_labelled(store, **kwargs)]
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="guard-labelled.jsonl"'},
    )


def page(
    stores: Sequence[LogStore], filters: Filters, limit: int, offset: int
) -> tuple[list[LogSummary], int]:
    """Rows ``offset..offset+limit`` of the stores' records merged newest first, and the total."""
    kw = filters.kwargs()
    if len(stores) == 1:
        return stores[0].list(limit=limit, offset=offset, **kw), stores[0].count(**kw)
    # Each store's first offset+limit rows hold every row of the merged page.
    rows = [r for s in stores for r in s.list(limit=offset + limit, offset=0, **kw)]
    rows.sort(key=lambda r: (r.created, r.id), reverse=True)
    return rows[offset : offset + limit], sum(s.count(**kw) for s in stores)


def monitor_views(
    record: GenerationRecord, served_thresholds: dict[str, float]
) -> list[MonitorView]:
    """Per monitor named anywhere in ``record``: its threshold, firing positions and highest score."""
    names: dict[str, None] = {}
    for name in [
        *record.final_scores,
        *(m for s in record.spans for m in s.scores),
        *(s.monitor for s in record.spans),
        *(f.monitor for f in record.firings),
        *record.prompt_scores,
        *(e.monitor for e in record.monitor_errors),
    ]:
        names.setdefault(name)
    views = []
    for name in names:
        known = [s.threshold for s in record.spans if s.monitor == name]
        known += [
            f.threshold for f in record.firings if f.monitor == name and f.threshold is not None
        ]
        firings = [f for f in record.firings if f.monitor == name]
        output = {s.fired_at for s in record.spans if s.monitor == name}
        output |= {f.position for f in firings if f.scope == "output"}
        prompt = sorted({f.position for f in firings if f.scope == "prompt"})
        scores = [
            v for s in record.spans for v in s.aggregated.get(name, [])
        ] + record.final_scores.get(name, [])
        views.append(
            MonitorView(
                name=name,
                threshold=known[0] if known else served_thresholds.get(name),
                fired=bool(output or prompt) or name in record.monitors_fired,
                output_firings=sorted(output),
                prompt_firings=prompt,
                max_score=max(scores, default=None),
            )
        )
    return views


def _summary(row: LogSummary) -> ReviewSummary:
    return ReviewSummary(
        id=row.id,
        created=row.created,
        request_id=row.request_id,
        policy_name=row.policy_name,
        policy_hash=row.policy_hash,
        model=row.model,
        outcome=row.outcome,
        finish_reason=row.finish_reason,
        resets=row.resets,
        monitors_fired=row.monitors_fired,
        preview=row.preview,
        label=row.label,
        label_note=row.label_note,
    )


def _label(label: Label) -> LabelView:
    return LabelView(
        log_id=label.log_id,
        label=label.label,
        note=label.note,
        reviewer=label.reviewer,
        created=_epoch(label.created),
    )


def _epoch(value: float | datetime) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)
