"""Request and response models of the review API (``/v1/guard/review/...``, :mod:`server.review`).

The full record is the log's own :class:`~guard.controller.record.GenerationRecord` (pydantic
builds its schema from the dataclass, so the OpenAPI schema cannot drift from what the log
stores); the views around it add what a reviewer needs and the record does not hold: labels,
per-monitor thresholds and firing positions, and the accepted output decoded token by token.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from guard.controller.events import FinishReason, LogOutcome, Outcome
from guard.controller.record import GenerationRecord

LabelName = Literal["true_positive", "false_positive", "unsure"]
"""A reviewer's verdict on a flagged generation (``guard.logstore.LABELS``)."""
LabelFilter = Literal["true_positive", "false_positive", "unsure", "unlabelled"]
OUTCOMES: tuple[Outcome, ...] = ("clean", "recovered", "refused")


class LabelRequest(BaseModel):
    """``POST /v1/guard/review/logs/{id}/labels``: a reviewer's verdict on one record."""

    model_config = ConfigDict(extra="forbid")

    label: LabelName
    note: str = Field(
        "", max_length=4000, description="Free text: why, what the monitor missed or got wrong."
    )
    reviewer: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"\S",
        description="Who labels (the review page asks for a name once per session).",
    )


class LabelView(BaseModel):
    """One stored label; a record's labels form its history, oldest first, the last one counts."""

    log_id: str
    label: LabelName
    note: str
    reviewer: str
    created: float = Field(description="When it was stored, epoch seconds.")


class ReviewSummary(BaseModel):
    """One row of the review list."""

    id: str
    created: float = Field(description="Epoch seconds.")
    request_id: str
    policy_name: str
    policy_hash: str
    model: str
    outcome: LogOutcome
    finish_reason: FinishReason | None
    resets: int = Field(description="Discarded spans.")
    monitors_fired: list[str]
    preview: str = Field(description="The first 200 characters of the final answer.")
    label: LabelName | None = Field(description="The latest label; null: not reviewed yet.")
    label_note: str | None = None


class ReviewList(BaseModel):
    """A page of the review list, newest first, merged over every served log store."""

    items: list[ReviewSummary]
    total: int = Field(description="Records matching the filters, over all pages.")
    limit: int
    offset: int


class MonitorView(BaseModel):
    """What the record says about one monitor, gathered from its spans, firings and scores."""

    name: str
    threshold: float | None = Field(
        description="The threshold the record was judged by (from its spans and "
        "firings, else from the served policy when it is the same "
        "version); null: unknown."
    )
    fired: bool = Field(
        description="Whether it fired anywhere in this record (log-only firings included)."
    )
    output_firings: list[int] = Field(
        description="Output positions where it fired (every attempt)."
    )
    prompt_firings: list[int] = Field(description="Prompt positions where it fired.")
    max_score: float | None = Field(
        description="Highest aggregated score over discarded spans and raw score "
        "over the accepted output; null: it scored no output token."
    )


class ReviewRecord(BaseModel):
    """``GET /v1/guard/review/logs/{id}``: everything the detail view shows."""

    id: str
    record: GenerationRecord = Field(description="The stored record, exactly as the log keeps it.")
    output_tokens: list[str] | None = Field(
        description="Each token of record.output_ids decoded on its own (for the token heatmap); null when no "
        "served tokenizer reproduces the record's answer (its model is no longer served)."
    )
    monitors: list[MonitorView]
    labels: list[LabelView] = Field(description="Label history, oldest first.")


class ReviewFilters(BaseModel):
    """``GET /v1/guard/review/filters``: the values the list can be filtered by."""

    policies: list[str]
    monitors: list[str]
    outcomes: list[Outcome]
    labels: list[LabelFilter]
