"""Small real artefacts for tests and benchmarks: a random-weight Llama with a real tokenizer.

Nothing here is a mock: :func:`make_random_llama` writes an ordinary HF model directory
(byte-level BPE tokenizer with a chat template, ``LlamaForCausalLM`` with random weights) that any
code path of the project can load.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|reset|>",
]


def make_tokenizer(texts: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_random_llama(
    out: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab_size: int = 512,
    context: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` + tokenizer to ``out`` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    texts = [
        "Hello there, how are you today? I am fine, thank you.",
        "The quick brown fox jumps over the lazy dog.",
    ] * 4
    tok = make_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_subprocess(policies: list[str | Path], log: Path, *extra: str, timeout: float = 180.0):
    """Start ``guard serve`` on a free loopback port; return ``(process, base_url)`` once /health answers.

    Raises ``RuntimeError`` (with the server's output) if it exits or does not come up in time.
    The caller terminates the process.
    """
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "guard.cli", "serve", "--port", str(port), *extra]
    for p in policies:
        cmd += ["--policy", str(p)]
    with Path(log).open("w") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"guard serve exited:\n{Path(log).read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"guard serve did not come up in {timeout:.0f} s:\n{Path(log).read_text()}")


def policy_with_absolute_paths(path: str | Path) -> dict:
    """A policy file's YAML as a dict, with every relative path made absolute (against the file).

    For benches and tests that write variants of a shipped policy somewhere else.
    """

    path = Path(path)
    raw = yaml.safe_load(path.read_text())

    def absolute(p: str) -> str:
        return str((path.parent / p).resolve())

    raw["model"]["path"] = absolute(raw["model"]["path"])
    for mon in raw.get("monitors", []):
        if "path" in mon:
            mon["path"] = absolute(mon["path"])
    if "spec_file" in (raw.get("deliberation") or {}):
        raw["deliberation"]["spec_file"] = absolute(raw["deliberation"]["spec_file"])
    if "path" in (raw.get("log") or {}):
        raw["log"]["path"] = absolute(raw["log"]["path"])
    return raw


def faulty_probe(probe, *, name: str, fail_at: int, fault: str, then: float | None = None):
    """A copy of ``probe`` for fault-injection tests, picklable into vLLM's worker: its
    ``fail_at``-th scoring call (counted in the process that scores) raises (``fault="raise"``) or
    returns NaN or inf (``fault="nan"`` / ``"inf"``); later calls score like the probe, or return
    ``then`` for every token when given (``then=1.0``: a monitor that would fire once past its fault)."""

    out = copy.copy(probe)
    out.__class__ = FaultyProbe
    out.name, out.fail_at, out.fault, out.then, out.calls = name, fail_at, fault, then, 0
    out._w_by_device = {}
    return out


from guard.monitors.probe import ProbeMonitor  # noqa: E402 - only the fault-injection probe needs torch


class FaultyProbe(ProbeMonitor):
    """See :func:`faulty_probe`."""

    fail_at: int
    fault: str
    then: float | None
    calls: int

    def score_tensor(self, hidden):
        import torch

        self.calls += 1
        n = hidden.shape[0]
        if self.calls == self.fail_at:
            if self.fault == "raise":
                raise RuntimeError("injected monitor fault")
            return torch.full((n,), float(self.fault), dtype=torch.float64, device=hidden.device)
        if self.calls > self.fail_at and self.then is not None:
            return torch.full((n,), float(self.then), dtype=torch.float64, device=hidden.device)
        return super().score_tensor(hidden)
