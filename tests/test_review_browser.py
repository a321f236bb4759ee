"""The review page in a real headless browser (Debian's chromium driven by Playwright) against
`guard serve` on the committed organism, with records from real guarded generations.

Needs /usr/bin/chromium (``apt-get install chromium``; ``.ci/run`` installs it). Without it the
tests skip, unless GUARD_TEST_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from guard.logstore import LogStore
from guard.testing import policy_with_absolute_paths, serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_ENV, ADMIN = "GUARD_REVIEW_TEST_ADMIN_KEY", "review-admin-key-for-tests"
REVIEWER = "Ada Lovelace"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
SCREENSHOT = Path("/tmp/review_detail.png")

pytestmark = pytest.mark.slow


def _unavailable(reason: str) -> None:
    if os.environ.get("GUARD_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (GUARD_TEST_REQUIRE_BROWSER=1: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _prompts(split: str, n: int) -> list[str]:
    rows = [
        json.loads(line)
        for line in (ORGANISM / "data" / "eval_prompts.jsonl").read_text().splitlines()
    ]
    return [r["prompt"] for r in rows if r["split"] == split][:n]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, api client, tmp): demo-probe and strict (two log databases), behind an admin key,
    with the records of real generations, plus one whose text is markup."""
    if not (ORGANISM / "probe" / "probe.json").is_file():
        pytest.skip("models/organism (with its probe) is not built")
    tmp = tmp_path_factory.mktemp("review-browser")
    paths = []
    for name, db in (("demo-probe", "probe.db"), ("strict", "strict.db")):
        policy = policy_with_absolute_paths(REPO / "policies" / f"{name}.yaml")
        policy["log"]["path"] = str(tmp / db)
        paths.append(tmp / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(policy))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ADMIN_ENV, ADMIN)
        try:
            proc, url = serve_in_subprocess(paths, tmp / "server.log", "--admin-key-env", ADMIN_ENV)
        except RuntimeError as exc:
            pytest.fail(str(exc))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        chats = [("demo-probe", p) for p in _prompts("heldout", 8)]
        chats += [("strict", p) for p in _prompts("benign", 2) + _prompts("trained", 3)]
        for i, (model, prompt) in enumerate(chats):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], seed=i, max_tokens=64
            )
        api = httpx.Client(
            base_url=f"{url}/v1/guard/review",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        # A real flagged record whose conversation, answer and discarded tokens are markup.
        with LogStore(tmp / "probe.db") as store:
            source = next(s for s in store.list(limit=100) if s.resets)
            rec = store.get(source.id)
            span = dataclasses.replace(rec.spans[0], tokens=[XSS, *rec.spans[0].tokens[1:]])
            xss_id = store.write(
                dataclasses.replace(
                    rec,
                    messages=[{"role": "user", "content": XSS}],
                    final_text=f"Answer {XSS}",
                    spans=[span, *rec.spans[1:]],
                    created=time.time() - 3600,
                )
            )
        yield url, api, tmp, xss_id
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def _sign_in(page, url: str, key: str = ADMIN, hash: str = "") -> None:
    page.goto(f"{url}/review{hash}")
    page.fill("#admin-key", key)
    page.fill("#reviewer-name", REVIEWER)
    page.click("#signin")


def _rows(page) -> list[str]:
    return page.locator("#log-list tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")


def test_list_renders_and_filters_narrow_it(server, page):
    from playwright.sync_api import expect

    url, api, _, _ = server
    everything = api.get("/logs").json()
    recovered = api.get("/logs", params={"outcome": "recovered"}).json()
    assert 0 < recovered["total"] < everything["total"] <= 50, (
        "the generations should give mixed outcomes"
    )
    _sign_in(page, url)
    expect(page.locator("#log-list tbody tr")).to_have_count(everything["total"])
    assert _rows(page) == [i["id"] for i in everything["items"]]  # both stores, newest first
    expect(page.locator("#range")).to_have_text(f"1–{everything['total']} of {everything['total']}")

    page.select_option("#filter-outcome", "recovered")
    expect(page.locator("#log-list tbody tr")).to_have_count(recovered["total"])
    assert _rows(page) == [i["id"] for i in recovered["items"]]
    outcomes = page.locator("#log-list tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.outcome)"
    )
    assert set(outcomes) == {"recovered"}
    assert "outcome=recovered" in page.url

    page.select_option("#filter-policy", "strict")
    strict = api.get("/logs", params={"outcome": "recovered", "policy": "strict"}).json()
    if strict["total"]:
        expect(page.locator("#log-list tbody tr")).to_have_count(strict["total"])
    else:
        expect(page.locator("#empty")).to_be_visible()


def test_detail_shows_the_heatmap_and_plot_and_a_label_survives_reload(server, page):
    from playwright.sync_api import expect

    url, api, tmp, xss_id = server
    row = next(
        i
        for i in api.get("/logs", params={"policy": "demo-probe", "outcome": "recovered"}).json()[
            "items"
        ]
        if i["id"] != xss_id
    )
    detail = api.get(f"/logs/{row['id']}").json()
    rec, span = detail["record"], detail["record"]["spans"][0]
    _sign_in(page, url, hash=f"#/log/{row['id']}")

    # The first discarded span, token by token, coloured by the monitor that fired.
    tokens = page.locator("#span-0 .tokens .tok")
    expect(tokens).to_have_count(len(span["tokens"]))
    assert page.locator("#span-0 .tokens").get_attribute("data-monitor") == span["monitor"]
    fired = page.locator("#span-0 .tok.fired")
    expect(fired).to_have_count(1)
    assert int(fired.get_attribute("data-pos")) == span["fired_at"]
    assert float(fired.get_attribute("data-score")) > span["threshold"]
    colours = tokens.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)")
    fired_colour = fired.evaluate("t => getComputedStyle(t).backgroundColor")
    assert fired_colour not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)")
    r, g, b = (int(c) for c in fired_colour[fired_colour.index("(") + 1 : -1].split(",")[:3])
    # Over the threshold the ramp runs orange (247, 150, 70) to red; under it, white to pale amber (g >= 222).
    assert r >= 190 and g <= 150 and b <= 70, (
        f"a token over the threshold should be orange to red, got {fired_colour}"
    )
    assert len(set(colours)) > 1, "scores below and above the threshold should differ in colour"
    assert page.locator("#span-0 .legend-thr").inner_text() == f"threshold {span['threshold']:.3f}"
    # ... and its score plot per monitor: the line, the threshold and the firing point.
    plot = page.locator(f"#span-0 svg.plot[data-monitor='{span['monitor']}']")
    expect(plot.locator("polyline.line")).to_have_count(1)
    expect(plot.locator("line.thr")).to_have_count(1)
    expect(plot.locator("circle.fired-mark")).to_have_count(1)
    points = plot.locator("polyline.line").get_attribute("points").split()
    assert len(points) == len(span["aggregated"][span["monitor"]])
    # The rest of the record.
    expect(page.locator("#policy-hash")).to_have_text(rec["policy_hash"][:12])
    expect(page.locator("#final-text")).to_have_text(rec["final_text"])
    expect(page.locator("#retries-table tbody tr")).to_have_count(len(rec["retries"]))
    expect(page.locator("#firings-table tbody tr")).to_have_count(len(rec["firings"]))
    if detail["output_tokens"]:
        expect(page.locator("#answer .tokens .tok")).to_have_count(len(rec["output_ids"]))

    # A label saves, with the reviewer, and survives a reload.
    before = time.time()
    page.fill("#label-note", "complied with the <b>harmful</b> request")
    page.click("#label-panel button[data-label='true_positive']")
    expect(page.locator("#label-status")).to_contain_text("Saved")
    page.reload()
    expect(page.locator("#label-history li")).to_have_count(1)
    expect(page.locator("#current-label")).to_have_text("True positive")
    item = page.locator("#label-history li").inner_text()
    assert REVIEWER in item and "complied with the <b>harmful</b> request" in item
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    (label,) = api.get(f"/logs/{row['id']}").json()["labels"]
    assert (label["label"], label["reviewer"]) == ("true_positive", REVIEWER)
    assert before - 1 <= label["created"] <= time.time()
    with LogStore(tmp / "probe.db") as store:
        assert [(x.label, x.reviewer, x.note) for x in store.labels(row["id"])] == [
            ("true_positive", REVIEWER, "complied with the <b>harmful</b> request")
        ]

    # The label filter narrows the list to it.
    page.click("#back")
    page.select_option("#filter-label", "true_positive")
    expect(page.locator("#log-list tbody tr")).to_have_count(1)
    assert _rows(page) == [row["id"]]
    page.select_option("#filter-label", "unlabelled")
    expect(page.locator("#log-list tbody tr")).to_have_count(api.get("/logs").json()["total"] - 1)


def test_record_text_is_shown_as_text_never_run(server, page):
    from playwright.sync_api import expect

    url, _, _, xss_id = server
    _sign_in(page, url, hash=f"#/log/{xss_id}")
    expect(page.locator("#conversation .content")).to_have_text(XSS)
    expect(page.locator("#final-text")).to_have_text(f"Answer {XSS}")
    expect(page.locator("#span-0 .tok").first).to_have_text(XSS)
    assert page.locator("#app img, #app script").count() == 0
    assert page.evaluate("window.__xss") is None


def test_a_wrong_admin_key_is_refused(server, page):
    from playwright.sync_api import expect

    url, _, _, _ = server
    _sign_in(page, url, key="not-the-key")
    expect(page.locator("#login .error")).to_contain_text("did not accept")
    assert page.locator("#log-list").count() == 0
    assert page.evaluate("sessionStorage.getItem('guard-review-key')") is None
