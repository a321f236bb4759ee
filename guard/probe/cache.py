"""On-disk cache of collected activations, so a sweep or a re-run does not run the model again.

Invariants:

- An entry's key is the sha256 of (cache format version, model fingerprint, the examples' prompt,
  completion and label in order (and messages, raw_prompt and context where a row has them), the
  sorted layers, the span). Anything that could change the
  activations changes the key; the data *file* is not part of the key, so the same rows read
  from a copied file (or a calibration subset rebuilt in memory) still hit.
- The model fingerprint is the sha256 of ``config.json`` plus name, size and mtime of every
  weight and tokenizer file in the model directory: re-saved weights miss, a moved-but-untouched
  checkout hits only if the mtimes survived the move.
- Entries are written to a temporary file and renamed into place, so a reader never sees a
  half-written entry; an unreadable entry counts as a miss and is overwritten.

Location: ``--cache-dir``, else ``$GUARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/guard/activations``
(``~/.cache/guard/activations``). Entries are plain safetensors files and may be deleted at will.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from guard.probe.collect import Activations
from guard.probe.data import Example

CACHE_VERSION = 1
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".json", ".model", ".jinja", ".txt")


def default_cache_dir() -> Path:
    env = os.environ.get("GUARD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "guard" / "activations"


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json's bytes and (name, size, mtime) of the directory's model files."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"<no config.json>")
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in _MODEL_FILES:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class ActivationCache:
    """Activations of one model, keyed by examples, layers and span (see the module docstring)."""

    def __init__(self, directory: str | Path | None, model_dir: str | Path) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.model = model_fingerprint(model_dir)
        self.hits = 0
        self.misses = 0

    def key(self, examples: list[Example], layers: list[int], span: str) -> str:
        h = hashlib.sha256(
            f"guard.activations v{CACHE_VERSION}\n{self.model}\n{sorted(layers)}\n{span}\n".encode()
        )
        for ex in examples:
            h.update(json.dumps([ex.prompt, ex.completion, ex.label]).encode())
            if (
                ex.messages is not None or ex.raw_prompt or ex.context
            ):  # rows without them keep their keys
                h.update(json.dumps([ex.messages, ex.raw_prompt, ex.context]).encode())
            h.update(b"\n")
        return h.hexdigest()

    def path_of(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> Activations | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path_of(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = load_file(str(path))
        except (OSError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        hidden = {int(k.split(".", 1)[1]): v for k, v in t.items() if k.startswith("hidden.")}
        completion = t["completion"].numpy().astype(bool) if "completion" in t else None
        return Activations(
            hidden, t["row"].numpy(), t["labels"].numpy(), t["token_ids"].numpy(), completion
        )

    def put(self, key: str, acts: Activations) -> Path:
        from safetensors.torch import save_file

        tensors = {f"hidden.{layer}": h.contiguous() for layer, h in acts.hidden.items()}
        tensors.update(
            row=torch.from_numpy(np.ascontiguousarray(acts.row, dtype=np.int64)),
            labels=torch.from_numpy(np.ascontiguousarray(acts.labels, dtype=np.int64)),
            token_ids=torch.from_numpy(np.ascontiguousarray(acts.token_ids, dtype=np.int64)),
        )
        if acts.completion is not None:
            tensors["completion"] = torch.from_numpy(acts.completion.astype(np.uint8))
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                tensors,
                tmp,
                metadata={"format": "guard.activations", "version": str(CACHE_VERSION)},
            )
            os.replace(tmp, self.path_of(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.path_of(key)
