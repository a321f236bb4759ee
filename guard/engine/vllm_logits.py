"""The guard's logits processor inside vLLM: forces the reset token, bans tokens.

Per row of the step's logits it applies, for requests that carry guard arguments
(:class:`guard.engine.vllm_worker.RequestArgs`):

- ``ban``: token ids never sampled; ``ban_first``: ids banned for the request's first token only
  (the resample strategy "ban the first token of the discarded span");
- the reset: when the worker's monitor states fired on the rows fed in this step
  (:data:`guard.engine.vllm_worker.STATE.fired`), every logit but the reset token's is set to
  ``-inf``, so the sampled token is the reset token whatever the temperature. The reset token is
  in the request's ``stop_token_ids``, so the scheduler finishes the request right there
  (``finish_reason="stop"``, ``stop_reason=<reset id>``) and frees its KV blocks, which keep
  their prefix-cache hashes.

Two classes, one per interface vLLM has:

- :class:`GuardLogitsProcessor`: the V1 interface (``vllm.v1.sample.logits_processor``), which the
  V1 model runner and its CPU subclass call after bad-words and before penalties and temperature.
  Rows are tracked through :class:`BatchUpdate` (removed, added, moved: in that order). Tested.
- :class:`GuardLogitsProcessorV2`: Model Runner V2's interface
  (``vllm.v1.worker.gpu.sample.logits_processor``): per-slot state set in ``add_request``, rows
  mapped to slots by the step's ``LogitsContext``. Its logic is unit-tested on vLLM's own context
  objects; it has not run inside a V2 runner here (V2 needs CUDA and Triton).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from guard.engine import vllm_worker
from guard.engine.vllm_worker import RequestArgs


class GuardLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[RequestArgs, list[int]]] = {}
        """Batch index -> (guard arguments, live reference to the request's output token ids)."""
        self.forced = 0
        """Reset tokens forced so far (a counter for tests)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = RequestArgs.from_extra_args(sampling_params.extra_args)
        if args is not None and args.reset_id < 0:
            raise ValueError("guard request arguments without a reset token id")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            args = RequestArgs.from_extra_args(params.extra_args if params is not None else None)
            if args is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (args, output)
        for a, b, kind in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if kind == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        fired = vllm_worker.STATE.fired
        for index, (args, output) in self.rows.items():
            if index >= logits.shape[0]:
                continue
            if args.key in fired:
                reset = args.reset_id
                row = logits[index]
                keep = row[reset].clone()
                row.fill_(float("-inf"))
                row[reset] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
                self.forced += 1
                continue
            if args.ban:
                logits[index, list(args.ban)] = float("-inf")
            if args.ban_first and not output:
                logits[index, list(args.ban_first)] = float("-inf")
        return logits


def _v2_base():
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2
    except ImportError:  # a vLLM without Model Runner V2
        return object
    return V2


if TYPE_CHECKING:
    _V2Base = object
else:
    _V2Base = _v2_base()


class GuardLogitsProcessorV2(_V2Base):
    def __init__(self, vllm_config=None, req_states=None) -> None:
        self.slots: dict[int, RequestArgs] = {}
        self.forced = 0

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        GuardLogitsProcessor.validate_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        args = RequestArgs.from_extra_args(
            sampling_params.extra_args if sampling_params is not None else None
        )
        if args is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = args
        return True

    def apply_staged_writes(self) -> None:
        pass

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self.slots:
            return logits
        rows = ctx.idx_mapping_np
        if (
            len(rows) != logits.shape[0]
        ):  # one row per draft token: map rows through the expanded mapping
            rows = ctx.expanded_idx_mapping.cpu().numpy()
        pos = None
        fired = vllm_worker.STATE.fired
        for row, slot in enumerate(rows.tolist()):
            args = self.slots.get(int(slot))
            if args is None:
                continue
            if args.key in fired:
                keep = logits[row, args.reset_id].clone()
                logits[row].fill_(float("-inf"))
                logits[row, args.reset_id] = torch.where(
                    torch.isfinite(keep), keep, torch.zeros_like(keep)
                )
                self.forced += 1
                continue
            if args.ban:
                logits[row, list(args.ban)] = float("-inf")
            if args.ban_first:
                if pos is None:
                    pos = ctx.pos.cpu().tolist()
                if (
                    pos[row] + 1 == args.start
                ):  # this row feeds the last prompt token: the first sample
                    logits[row, list(args.ban_first)] = float("-inf")
        return logits
