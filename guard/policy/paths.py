"""Where the files a policy names (spec, probe, SAE) may be, and how big they may be.

A policy file is configuration, and whoever can write one must not be able to make the server
read arbitrary files into a prompt or a monitor. The rules, checked when a policy is validated
(so ``guard policy check`` and serving, hot reloads included, agree):

1. The path, symlinks followed, is a regular file or a directory; a directory's entries are
   regular files or directories. Never a device, FIFO or socket.
2. It does not lie under a system directory (:data:`SYSTEM_DIRS`: ``/dev``, ``/proc``, ``/sys``,
   ``/etc``, ``/boot``, ``/run``, ``/var/run``, ``/root``).
3. When ``GUARD_ARTIFACT_ROOTS`` is set (directories separated by ``:``), it lies under one of
   them or under the policy file's own directory. Operators who serve policies written by others
   set it.
4. Sizes: a spec file is at most :data:`MAX_SPEC_BYTES` of UTF-8 text without NUL; each file of
   a probe directory at most :data:`MAX_PROBE_FILE_BYTES`; each SAE file at most
   :data:`MAX_SAE_FILE_BYTES`.

Rules 1 and 4 need the files and are skipped with ``--no-path-check``; 2 and 3 never are.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ROOTS_ENV = "GUARD_ARTIFACT_ROOTS"
SYSTEM_DIRS = tuple(
    Path(p) for p in ("/dev", "/proc", "/sys", "/etc", "/boot", "/run", "/var/run", "/root")
)
MAX_SPEC_BYTES = 256 * 1024
MAX_PROBE_FILE_BYTES = 64 * 1024 * 1024
MAX_SAE_FILE_BYTES = 16 * 1024**3
MAX_DIR_ENTRIES = 1000

LIMITS = {
    "spec file": MAX_SPEC_BYTES,
    "probe directory": MAX_PROBE_FILE_BYTES,
    "SAE": MAX_SAE_FILE_BYTES,
}


def check_location(
    path: Path, what: str, policy_dir: Path | None, env: dict[str, str] | None = None
) -> None:
    """Rules 2 and 3 for the resolved ``path``; ValueError naming the rule broken."""
    real = Path(os.path.realpath(path))
    for system in SYSTEM_DIRS:
        if real == system or system in real.parents:
            raise ValueError(
                f"{what} {path} is under the system directory {system}; policy files may not "
                "point there"
            )
    roots_env = (os.environ if env is None else env).get(ROOTS_ENV, "").strip()
    if not roots_env:
        return
    roots = [Path(os.path.realpath(r)) for r in roots_env.split(os.pathsep) if r.strip()]
    if policy_dir is not None:
        roots.append(Path(os.path.realpath(policy_dir)))
    if not any(real == r or r in real.parents for r in roots):
        raise ValueError(
            f"{what} {path} is outside the allowed roots ({ROOTS_ENV}={roots_env} and the "
            "policy's directory)"
        )


def check_files(path: Path, what: str) -> None:
    """Rules 1 and 4 for an existing ``path``; ValueError naming the offending file."""
    limit = LIMITS.get(what)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as entries:
            for i, entry in enumerate(entries):
                if i >= MAX_DIR_ENTRIES:
                    raise ValueError(f"{what} {path} has more than {MAX_DIR_ENTRIES} entries")
                est = os.stat(entry.path)
                if stat.S_ISDIR(est.st_mode):
                    continue
                _check_regular(Path(entry.path), est, what, limit)
        return
    _check_regular(path, st, what, limit)


def _check_regular(path: Path, st: os.stat_result, what: str, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file (device, FIFO or socket)")
    if limit is not None and st.st_size > limit:
        raise ValueError(f"{what} {path} is {st.st_size} bytes; at most {limit} are allowed")


def read_spec(path: Path) -> str:
    """The spec file's text, re-checked (it may have changed since validation): regular, small, UTF-8, no NUL."""
    check_files(path, "spec file")
    with open(path, "rb") as f:
        raw = f.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise ValueError(f"spec file {path} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"spec file {path} is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None
    if "\x00" in text:
        raise ValueError(f"spec file {path} contains a NUL byte (at offset {text.index(chr(0))})")
    return text
