"""docs/policy.md is generated from the schema (`guard policy docs`); it must not go stale."""

from __future__ import annotations

from pathlib import Path

from guard.policy.docs import _models_in_order, render_docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policy.md"


def test_committed_docs_match_the_schema():
    assert DOCS.read_text() == render_docs(), (
        "docs/policy.md is stale: run `guard policy docs --out docs/policy.md` and commit it"
    )


def test_docs_cover_every_field_with_its_allowed_values():
    text = render_docs()
    for model, _ in _models_in_order():
        assert f"## {model.__name__}" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing from the docs"
    assert '| `scope` | one of `"prompt"`, `"output"`, `"both"` | `"output"` |' in text
    assert '| `action` | one of `"backtrack"`, `"refuse"`, `"shadow"` | `"backtrack"` |' in text
    assert (
        '| `on_monitor_error` | one of `"fail_closed"`, `"fail_open"` | `"fail_closed"` |' in text
    )


def test_guard_policy_docs_writes_the_file(tmp_path, capsys):
    from guard.cli import main

    out = tmp_path / "sub" / "policy.md"
    assert main(["policy", "docs", "--out", str(out)]) == 0
    assert out.read_text() == render_docs()
    assert main(["policy", "docs"]) == 0 and capsys.readouterr().out == render_docs()
