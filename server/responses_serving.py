"""Serving ``POST /v1/responses``: the guarded generation core of :mod:`server.serving`, mapped
onto the Responses API's objects and event stream.

One request is one generation (the Responses API has no ``n``). A stream is, in order:
``response.created``, ``response.in_progress``, ``response.output_item.added`` (the assistant
message), ``response.content_part.added`` (its ``output_text`` part), any number of
``response.output_text.delta`` events, then ``response.output_text.done`` (the final text),
``response.content_part.done``, ``response.output_item.done`` and ``response.completed`` (or
``response.incomplete`` with ``incomplete_details.reason`` ``max_output_tokens`` or
``content_filter``). Every event carries an increasing ``sequence_number``; a failure after the
stream started is one ``error`` event, and the stream ends.

Guard's additions, the same contract as chat completions: a client that opted in to resets
(``stream_options.guard_resets`` or ``X-Guard-Resets``) gets ``response.guard.reset`` events
(drop the last ``reset.retract_chars`` characters of the text part). Every other client is shown
only settled text, never retracted; a rollback that would reach it ends the message with a second
content part of type ``refusal`` (``response.content_part.added``, ``response.refusal.delta``,
``response.refusal.done``, ``response.content_part.done``) and the response is ``incomplete``
with reason ``content_filter``.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

from guard.controller.events import Cut, Failed, Finished, Reset, TextDelta
from guard.errors import GuardError
from guard.service import GenerationRequest
from server.auth import Caller
from server.errors import error_response
from server.limits import check_responses
from server.protocol import GuardReset
from server.responses_protocol import (
    ContentPartEvent,
    ErrorEvent,
    GuardResetEvent,
    IncompleteDetails,
    OutputItemEvent,
    OutputMessage,
    OutputRefusal,
    OutputText,
    RefusalDeltaEvent,
    RefusalDoneEvent,
    ResponseEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from server.serving import (
    EVERYONE,
    GuardedServing,
    IsDisconnected,
    Prepared,
    client_retracts,
    guard_info,
)

_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens"}
"""Service error params named by their Responses API field."""


class ResponsesServing(GuardedServing):
    """``POST /v1/responses``."""

    id_prefix = "resp"

    async def create(
        self,
        req: ResponsesRequest,
        *,
        is_disconnected: IsDisconnected,
        caller: Caller = EVERYONE,
        resets_header: bool = False,
    ) -> ResponseObject | AsyncIterator[str]:
        """A :class:`ResponseObject`, or the SSE body when ``req.stream``."""
        check_responses(req, self.limits)
        rid = f"resp_{uuid.uuid4().hex}"
        gen = GenerationRequest(
            model=req.model,
            request_id=rid,
            messages=req.messages(),
            max_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=None if req.top_k == -1 else req.top_k,
            seed=req.seed,
            stop=req.stop_tuple(),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            sampling=req.sampling_extensions(),
            allowed_models=caller.policies,
            group=rid,
            client_retracts=client_retracts(req, resets_header),
        )
        try:
            prepared = await self.prepare([gen], "input")
        except GuardError as exc:
            exc.param = _PARAMS.get(exc.param or "", exc.param)
            raise
        if req.stream:
            return self.sse(rid, req, prepared, is_disconnected)
        [finished] = await self.finish_all(prepared, is_disconnected)
        message = OutputMessage(
            id=f"msg_{uuid.uuid4().hex}",
            status=_item_status(finished),
            content=[OutputText(text=finished.text)],
        )
        return response_object(rid, req, prepared[0], finished, [message])

    async def sse(
        self,
        rid: str,
        req: ResponsesRequest,
        prepared: list[Prepared],
        is_disconnected: IsDisconnected,
    ) -> AsyncIterator[str]:
        """The response body of a stream: ``event: TYPE`` / ``data: {event}`` pairs."""
        seq, item_id = itertools.count(), f"msg_{uuid.uuid4().hex}"

        def send(event: ResponseEvent) -> str:
            event.sequence_number = next(seq)
            return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"

        opening = response_object(rid, req, prepared[0], None, [])
        try:
            yield send(ResponseLifecycleEvent(type="response.created", response=opening))
            yield send(ResponseLifecycleEvent(type="response.in_progress", response=opening))
            item = OutputMessage(id=item_id, status="in_progress", content=[])
            yield send(OutputItemEvent(type="response.output_item.added", item=item))
            yield send(
                ContentPartEvent(
                    type="response.content_part.added",
                    item_id=item_id,
                    content_index=0,
                    part=OutputText(text=""),
                )
            )
            finished: Finished | None = None
            cut: Cut | None = None
            text = ""
            async with aclosing(self.events(prepared, is_disconnected)) as events:
                async for _, event in events:
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, TextDelta) and event.text:
                        text += event.text
                        yield send(
                            TextDeltaEvent(
                                type="response.output_text.delta", item_id=item_id, delta=event.text
                            )
                        )
                    elif isinstance(event, Reset):
                        text = text[: len(text) - event.retract_chars]
                        yield send(GuardResetEvent(item_id=item_id, reset=_reset(event)))
                    elif isinstance(event, Cut):
                        cut = event
                    elif isinstance(event, Finished):
                        finished = event
            if finished is None:
                return  # the client is gone
            for part in _closing_events(item_id, text if cut else finished.text, cut):
                yield send(part)
            parts: list[OutputText | OutputRefusal] = [
                OutputText(text=text if cut else finished.text)
            ]
            parts += [OutputRefusal(refusal=cut.refusal)] if cut else []
            item = OutputMessage(id=item_id, status=_item_status(finished), content=parts)
            yield send(OutputItemEvent(type="response.output_item.done", item=item))
            final = response_object(rid, req, prepared[0], finished, [item])
            kind = "response.completed" if final.status == "completed" else "response.incomplete"
            yield send(ResponseLifecycleEvent(type=kind, response=final))
        except Exception as exc:  # noqa: BLE001 - the status line is sent; errors become an event
            _, body = error_response(exc)
            yield send(
                ErrorEvent(
                    code=body.error.code or body.error.type,
                    message=body.error.message,
                    param=body.error.param,
                )
            )


def _closing_events(item_id: str, text: str, cut: Cut | None) -> Iterator[ResponseEvent]:
    """Close the text part; after a cut, add the refusal as its own part."""
    yield TextDoneEvent(type="response.output_text.done", item_id=item_id, text=text)
    yield ContentPartEvent(
        type="response.content_part.done",
        item_id=item_id,
        content_index=0,
        part=OutputText(text=text),
    )
    if cut is None:
        return
    yield ContentPartEvent(
        type="response.content_part.added",
        item_id=item_id,
        content_index=1,
        part=OutputRefusal(refusal=""),
    )
    yield RefusalDeltaEvent(
        type="response.refusal.delta", item_id=item_id, content_index=1, delta=cut.refusal
    )
    yield RefusalDoneEvent(
        type="response.refusal.done", item_id=item_id, content_index=1, refusal=cut.refusal
    )
    yield ContentPartEvent(
        type="response.content_part.done",
        item_id=item_id,
        content_index=1,
        part=OutputRefusal(refusal=cut.refusal),
    )


def response_object(
    rid: str,
    req: ResponsesRequest,
    prepared: Prepared,
    finished: Finished | None,
    output: list[OutputMessage],
) -> ResponseObject:
    """The ``Response``: in progress while ``finished`` is ``None``."""
    common = dict(
        id=rid,
        model=prepared.model,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        metadata=req.metadata or {},
        output=output,
    )
    if finished is None:
        return ResponseObject(status="in_progress", **common)
    u = finished.usage
    usage = ResponseUsage(
        input_tokens=prepared.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=prepared.prompt_tokens + u.completion_tokens,
    )
    usage.output_tokens_details.reasoning_tokens = u.reasoning_tokens
    status = _item_status(finished)
    incomplete = None
    if status == "incomplete":
        incomplete = IncompleteDetails(
            reason="max_output_tokens" if finished.finish_reason == "length" else "content_filter"
        )
    return ResponseObject(
        status=status,
        incomplete_details=incomplete,
        usage=usage,
        guard=guard_info(finished),
        **common,
    )


def _item_status(finished: Finished) -> str:
    return "completed" if finished.finish_reason == "stop" else "incomplete"


def _reset(r: Reset) -> GuardReset:
    return GuardReset(
        retract_chars=r.retract_chars,
        retract_tokens=r.retract_tokens,
        monitor=r.monitor,
        retry=r.retry,
        marker=r.marker,
    )
