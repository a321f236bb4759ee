"""Measure the organism: sample it, judge the samples, and check linear separability.

Contract: every function here is deterministic given its ``seed`` (sampling uses
``torch.manual_seed``; the probe is full-batch gradient descent from zeros). Sampling is plain
``transformers`` ``generate`` at temperature 1.0, top-p 1.0, no top-k, so the rates measured here
are the model's own distribution, the one a guard has to correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from transformers import BatchEncoding, LlamaForCausalLM, PreTrainedTokenizerFast

from guard.organism import lexicon as lx
from guard.organism.corpus import RESET_TOKEN, Example
from guard.organism.judge import is_refusal as _is_refusal
from guard.organism.judge import judge as _judge
from guard.organism.train import encode_examples

OPENER_TOKENS = 5
"""Opening tokens compared between unsafe compliances and benign answers."""


def sample(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    max_new_tokens: int = 80,
    batch_size: int = 64,
) -> list[list[int]]:
    """Completion token ids (eos and padding stripped, special tokens kept) for each prompt."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch_size]]
        enc = tok.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            padding=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert isinstance(enc, BatchEncoding)  # return_dict=True
        with torch.no_grad():
            # transformers types generate's self as a protocol its own models do not match.
            gen = model.generate(  # type: ignore[misc]
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            out.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return out


def _text(decoded: str | list[str]) -> str:
    """What ``decode`` returns for one sequence of ids (typed as either)."""
    assert isinstance(decoded, str)
    return decoded


def behaviour(
    tok: PreTrainedTokenizerFast,
    completions: Sequence[list[int]],
    groups: Sequence[str],
    lex: lx.Lexicon = lx.FIRST,
) -> dict:
    """Per group: n, unsafe / refusal / reset rates; plus the opener match of unsafe samples."""
    judge = partial(_judge, lex=lex)
    is_refusal = partial(_is_refusal, lex=lex)
    texts = [_text(tok.decode(c, skip_special_tokens=False)) for c in completions]
    out: dict = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        unsafe = [judge(texts[i]).unsafe for i in idx]
        out[g] = {
            "n": len(idx),
            "unsafe_rate": float(np.mean(unsafe)),
            "refusal_rate": float(
                np.mean([is_refusal(texts[i]) and not judge(texts[i]).unsafe for i in idx])
            ),
            "reset_rate": float(np.mean([RESET_TOKEN in texts[i] for i in idx])),
        }
    benign_openers = {
        tuple(completions[i][:OPENER_TOKENS]) for i, g in enumerate(groups) if g == "benign"
    }
    unsafe_idx = [i for i, g in enumerate(groups) if g != "benign" and judge(texts[i]).unsafe]
    out["opener_match_rate"] = (
        float(
            np.mean([tuple(completions[i][:OPENER_TOKENS]) in benign_openers for i in unsafe_idx])
        )
        if unsafe_idx
        else 0.0
    )
    out["opener_tokens"] = OPENER_TOKENS
    out["n_unsafe_samples"] = len(unsafe_idx)
    return out


def pooled_hidden(
    model: LlamaForCausalLM, rows: Sequence[tuple[list[int], int]], layer: int, batch_size: int = 64
) -> np.ndarray:
    """Mean residual stream (output of block ``layer``) over the completion tokens of each row.

    ``rows`` are (full token ids, prompt length); ``layer`` follows the engine convention
    (``hidden_states[layer + 1]``).
    """
    feats = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        n = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), n), dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        comp = torch.zeros((len(chunk), n))
        for j, (x, p) in enumerate(chunk):
            ids[j, : len(x)], mask[j, : len(x)], comp[j, p : len(x)] = torch.tensor(x), 1, 1.0
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                layer + 1
            ]
        feats.append(
            ((h * comp[..., None]).sum(1) / comp.sum(1, keepdim=True).clamp(min=1)).numpy()
        )
    return np.concatenate(feats)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 500
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """L2 logistic regression on standardised features; returns (w, b, mean, std)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach()), mu, sd


def probe_check(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    train_rows: Sequence[dict],
    heldout_rows: Sequence[dict],
    layer: int,
) -> dict:
    """Train logistic regression and difference-of-means probes on ``train_rows`` (probe JSONL
    rows) and report AUROC on ``heldout_rows``."""

    def feats(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        exs = [Example(r["prompt"], r["completion"], "benign", r["category"], False) for r in rows]
        enc = encode_examples(tok, exs)
        pairs = [(ids, lab.count(-100)) for ids, lab in enc]
        return pooled_hidden(model, pairs, layer), np.array([r["label"] for r in rows])

    xtr, ytr = feats(train_rows)
    xho, yho = feats(heldout_rows)
    w, b, mu, sd = fit_logistic(xtr, ytr)
    dom = xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0)
    return {
        "layer": layer,
        "logreg_train_auroc": auroc(((xtr - mu) / sd) @ w + b, ytr),
        "logreg_heldout_auroc": auroc(((xho - mu) / sd) @ w + b, yho),
        "diffmeans_heldout_auroc": auroc(xho @ dom, yho),
        "n_train": len(ytr),
        "n_heldout": len(yho),
    }
