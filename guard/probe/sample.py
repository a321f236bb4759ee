"""The model's own answers to benign prompts, sampled through the serving engine, with the activations
a live monitor would read on them: what ``guard probe train`` calibrates thresholds on by default.

Contract: :func:`sample_answers` drives the same :class:`~guard.engine.base.Engine` calls and the
same sampler (:func:`guard.sampling.sample`) as serving: chat template through
``engine.tokenizer.encode_chat``, ``prefill``, then one ``step`` per token at the given
temperature / top-p, until an end-of-sequence token or ``max_tokens``. Activations are those the
engine reports for the fed answer tokens (the end-of-sequence token is never fed, as live), so
nothing is re-tokenized. Sample ``j`` of prompt ``i`` uses seed ``seed + i * n + j``: the result is
a pure function of the model, prompts, parameters and seed. With an activation cache a repeated run
is read from disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from guard.engine.base import Engine
from guard.probe.collect import Activations, Progress
from guard.probe.data import DataError
from guard.sampling import SamplingParams, make_generator

if TYPE_CHECKING:
    from guard.probe.cache import ActivationCache


class SampledAnswers(NamedTuple):
    """Sampled answers as probe rows (all label 0) with their live activations."""

    acts: Activations
    """Rows in order prompt 0 sample 0, prompt 0 sample 1, ...; labels all 0."""
    texts: list[str]
    """Decoded answers, same order."""


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Chats from a JSONL file of ``{"prompt": str}`` (a user message) or ``{"messages": [...]}`` rows;
    other keys are ignored. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file")
    chats = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            chats.append(
                [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
            )
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]:
            chats.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise DataError(f'{path}:{lineno}: expected {{"prompt": str}} or {{"messages": [...]}}')
    if not chats:
        raise DataError(f"{path}: the file has no prompts")
    return chats


def sample_answers(
    engine: Engine,
    chats: list[list[dict[str, str]]],
    layers: list[int],
    *,
    n: int,
    params: SamplingParams,
    seed: int = 0,
    progress: bool = True,
    cache: ActivationCache | None = None,
) -> SampledAnswers:
    """``n`` sampled answers per chat with their activations at ``layers`` (see the module docstring)."""
    layers = sorted(set(layers))
    key = _key(cache, chats, layers, n, params, seed) if cache is not None else None
    if cache is not None and key is not None:
        hit = cache.get(key)
        if hit is not None:
            if progress:
                print(
                    f"calibration answers: {hit.n_rows} from cache {cache.path_of(key)}",
                    file=sys.stderr,
                )
            return SampledAnswers(hit, _texts(engine, hit))
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    ids_out: list[np.ndarray] = []
    bar = Progress("calibration answers", len(chats) * n, enabled=progress)
    for i, chat in enumerate(chats):
        prompt = engine.tokenizer.encode_chat(chat)
        for j in range(n):
            hidden, ids = _one(engine, prompt, layers, params, make_generator(seed + i * n + j))
            if not ids:
                continue  # an immediate end of sequence: no token a monitor would score
            for layer in layers:
                chunks[layer].append(hidden[layer])
            ids_out.append(np.asarray(ids, dtype=np.int64))
            bar.update(i * n + j + 1)
    bar.close()
    if not ids_out:
        raise DataError(
            "every sampled calibration answer was empty; check the prompts and the model"
        )
    rows = [np.full(len(ids), r) for r, ids in enumerate(ids_out)]
    acts = Activations(
        {layer: torch.cat(c) for layer, c in chunks.items()},
        np.concatenate(rows),
        np.zeros(len(ids_out), dtype=np.int64),
        np.concatenate(ids_out),
    )
    if cache is not None and key is not None:
        cache.put(key, acts)
    return SampledAnswers(acts, _texts(engine, acts))


def _one(
    engine: Engine,
    prompt: list[int],
    layers: list[int],
    params: SamplingParams,
    gen: torch.Generator,
) -> tuple[dict[int, torch.Tensor], list[int]]:
    """One answer: activations of its fed tokens per layer and its token ids (no end-of-sequence)."""
    seq = engine.new_sequence(prompt, layers)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    eos = engine.info.eos_token_ids | frozenset(params.stop_token_ids)
    try:
        engine.prefill(seq)
        done = False
        while not done:
            out = engine.step(seq, params, gen)
            for layer, h in out.hidden.items():
                parts[layer].append(h.float().cpu())
            done = out.token_id in eos or len(seq.output_ids) >= params.max_tokens
        ids = seq.output_ids
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        else:
            out = engine.step(
                seq, params, gen, sample=False
            )  # feed the last token, as live scoring does
            for layer, h in out.hidden.items():
                parts[layer].append(h.float().cpu())
    finally:
        engine.release(seq)
    d = engine.info.d_model
    hidden = {
        layer: (torch.cat(p) if p else torch.zeros(0, d))[: len(ids)] for layer, p in parts.items()
    }
    return hidden, list(ids)


def _texts(engine: Engine, acts: Activations) -> list[str]:
    if acts.token_ids is None:
        raise ValueError("sampled answers carry their token ids; these activations have none")
    token_ids = acts.token_ids
    bounds = np.searchsorted(acts.row, np.arange(acts.n_rows + 1))
    return [engine.tokenizer.decode(token_ids[a:b].tolist()) for a, b in itertools.pairwise(bounds)]


def _key(
    cache: ActivationCache, chats, layers: list[int], n: int, params: SamplingParams, seed: int
) -> str:
    h = hashlib.sha256(f"guard.sampled-answers v1\n{cache.model}\n{layers}\n{n}\n{seed}\n".encode())
    h.update(
        json.dumps([params.temperature, params.top_p, params.top_k, params.max_tokens]).encode()
    )
    h.update(json.dumps(chats).encode())
    return h.hexdigest()
