"""Hot reload from a Kubernetes ConfigMap volume: the kubelet's atomic writer never edits a file in
place; it writes a new timestamped directory, swaps the ``..data`` symlink to it with a rename and
deletes the old directory, while each key stays a symlink ``NAME -> ..data/NAME``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from test_reload import policy_text

from guard.service import GuardService


def project(mount: Path, version: str, files: dict[str, str]) -> None:
    """Publish ``files`` as the kubelet does: new ``..VERSION`` dir, then rename ``..data`` onto it."""
    target = mount / f"..{version}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(target.name, mount / "..data_tmp")
    os.replace(
        mount / "..data_tmp", mount / "..data"
    )  # atomic: a reader sees the old or the new set
    for name in files:
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    if old is not None:
        shutil.rmtree(mount / old)


def test_a_configmap_update_through_the_symlink_swap_is_reloaded(tiny_model_dir, tmp_path):
    mount = tmp_path / "policies"
    mount.mkdir()
    project(
        mount,
        "2026_12_01_00_00_00.1",
        {"p.yaml": policy_text(tiny_model_dir, tmp_path / "guard.db")},
    )
    service = GuardService.from_policy_files([mount / "p.yaml"])
    try:
        assert service.reload_changed() == []
        project(
            mount,
            "2026_12_01_00_01_00.2",
            {
                "p.yaml": policy_text(
                    tiny_model_dir, tmp_path / "guard.db", holdback=3, refusal="Nope."
                )
            },
        )
        assert not (
            mount / "..2026_12_01_00_00_00.1"
        ).exists()  # the file the policy was first read from is gone
        assert service.reload_changed() == ["p"]
        assert (
            service.resolve("p").config.holdback_tokens,
            service.resolve("p").config.refusal,
        ) == (3, "Nope.")
        health = service.health()["models"][0]
        assert health["source"] == str(mount / "p.yaml") and health["reload_error"] is None
        assert health["reloads"] == 1
        project(
            mount, "2026_12_01_00_02_00.3", {"p.yaml": "name: p\nmodel: {path: /nonexistent}\n"}
        )
        assert (
            service.reload_changed() == []
        )  # a bad update keeps the last good policy and says why
        assert "nonexistent" in service.health()["models"][0]["reload_error"]
    finally:
        service.close()
