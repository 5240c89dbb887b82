"""The web page at `/`: served with its files and a strict policy (always), and driven in a real headless
Chromium against `wanserve serve` (where Chromium is installed): type a prompt, watch the video arrive and play
it, see a wrong field named, cancel, delete, and the API-key prompt."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.catalog import lookup
from wanserve.config import Settings
from wanserve.jobs.sqlite import SQLiteJobStore
from wanserve.storage.local import LocalStorage

from service import Process, base_env, free_port, wait_for, wait_ready
from videos import png_bytes


def _client(tmp_path: Path, **settings: Any) -> TestClient:
    config = Settings(data_dir=tmp_path, **settings)
    spec = lookup("tiny-t2v")
    assert spec is not None
    store = SQLiteJobStore(tmp_path / "jobs.db")
    return TestClient(create_app(config, store, LocalStorage(tmp_path / "videos"), {"tiny-t2v": spec}))


def test_the_page_and_every_file_it_loads_are_served(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        # No inline script can run, and no other site may frame the page (it has cancel and delete buttons).
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert client.head("/").status_code == 200
        assert '<form id="create"' in page.text
        files = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
        assert sorted(files) == ["static/app.js", "static/style.css"]
        types = {"js": "text/javascript", "css": "text/css"}
        for name in files:
            answer = client.get(f"/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"].startswith(types[name.rsplit(".", 1)[1]])
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["cache-control"] == "no-cache"  # an upgrade is picked up at the next load
        assert client.get("/static/nothing.js").status_code == 404
        # The page is not part of the API's schema.
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_page_needs_no_key_but_its_calls_do(tmp_path: Path) -> None:
    with _client(tmp_path, api_key="k1") as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/v1/videos").status_code == 401


def test_no_web_page_when_turned_off(tmp_path: Path) -> None:
    with _client(tmp_path, web=False) as client:
        assert client.get("/").status_code == 404
        assert client.get("/static/app.js").status_code == 404
        assert client.get("/v1/models").status_code == 200


def test_redirected_downloads_may_play_from_the_bucket(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        assert "https:" not in client.get("/").headers["content-security-policy"]
    with _client(tmp_path, storage_redirect=True) as client:
        assert "media-src 'self' blob: https: http:" in client.get("/").headers["content-security-policy"]


# In a browser ------------------------------------------------------------------------------------------------

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
browser_only = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium); the page's HTTP tests still ran"
)
# Slow enough that a second job waits in the queue behind it.
SLOW = {"#num_frames": "33", "#num_inference_steps": "200", "#size": "256x256"}


class Site:
    """`wanserve serve` (`role="api"`: the API alone, whose videos stay queued) on a port of its own."""

    def __init__(self, tmp: Path, cache: Path, role: str = "serve", **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [role, "--port", str(self.port), "--data-dir", str(tmp / "data")]
        args += ["--model", "tiny-t2v", "--model", "tiny-i2v"]
        self.process = Process(args, base_env(cache, **env), tmp / "serve.log")
        wait_ready(self.url, self.process)


def _wait_for_queue_line(page: Any, site: Site, line: str) -> None:
    """Until the line under Model says `line`; a failure says what the page, the API and the server said."""
    try:
        page.wait_for_function(
            "line => document.querySelector('#model-info').textContent.includes(line)", arg=line, timeout=60_000
        )
    except Exception as exc:
        videos = [(v["prompt"], v["status"]) for v in httpx.get(f"{site.url}/v1/videos").json()["data"]]
        shown = page.text_content("#model-info")
        raise AssertionError(f"{line!r} not shown: {shown!r}; videos {videos}; server:\n{site.process.log()}") from exc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The flags keep Chromium from calling home, which a machine without network refuses slowly.
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[*flags, "--disable-sync"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(60_000)
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def _card(page: Any, status: str) -> Any:
    return page.locator(f".job[data-status={status}]")


def _fill(page: Any, fields: dict[str, str]) -> None:
    if any(name != "#prompt" for name in fields) and not page.locator("details").evaluate("d => d.open"):
        page.click("details summary")
    for selector, value in fields.items():
        page.fill(selector, value)


@browser_only
@pytest.mark.slow
def test_a_prompt_becomes_a_video_that_plays_in_the_page(
    page: Any, tmp_path: Path, tiny_cache: Path, browser: Any
) -> None:
    site = Site(tmp_path, tiny_cache)
    try:
        page.goto(site.url)
        page.wait_for_selector("#model option[value=tiny-i2v]", state="attached")
        assert page.input_value("#model") == "tiny-t2v"

        # A prompt with markup in it is shown as the text it is.
        prompt = 'a red fox <img src=x onerror="document.title=1">'
        _fill(page, {"#prompt": prompt, "#num_frames": "9", "#num_inference_steps": "2"})
        # The server serves exact; a request may ask for fast, which the card then names.
        assert page.locator("#preset option").all_text_contents()[0].startswith("exact")
        page.select_option("#preset", "fast")
        page.click("#generate")
        video = _card(page, "completed").locator("video")
        video.wait_for()
        page.wait_for_function("() => document.querySelector('.job video').duration > 0")
        width, duration = video.evaluate("v => [v.videoWidth, v.duration]")
        assert width == 64 and duration > 0  # the browser decoded the MP4
        card = _card(page, "completed")
        assert card.locator(".prompt").text_content() == prompt and card.locator("img").count() == 0
        detail = card.locator(".detail").text_content()
        assert "9 frames" in detail and "fast, " in detail and "% of steps reused" in detail
        job_id = card.get_attribute("data-id")
        download = card.locator("a[download]")
        # Saved, not shown: also where the answer is a redirect to a bucket, whose origin ignores `download`.
        assert download.get_attribute("href") == f"v1/videos/{job_id}/content?disposition=attachment"
        assert card.locator("video").get_attribute("src") == f"v1/videos/{job_id}/content"  # streamed, seekable

        # A wrong field is named, and the control holding it marked.
        _fill(page, {"#num_frames": "6"})
        page.click("#generate")
        page.wait_for_function("() => document.querySelector('#create-error').textContent !== ''")
        assert "num_frames" in page.text_content("#create-error")
        assert page.get_attribute("#num_frames", "aria-invalid") == "true"

        # Image-to-video: the model needs an image, and says so before sending anything.
        page.select_option("#model", "tiny-i2v")
        assert page.is_visible("#input_reference")
        page.click("#generate")
        assert "input_reference" in page.text_content("#create-error")
        image = tmp_path / "ball.png"
        image.write_bytes(png_bytes((200, 40, 40)))
        page.set_input_files("#input_reference", str(image))
        _fill(page, {"#num_frames": "5", "#num_inference_steps": "2"})
        page.click("#generate")
        wait_for(lambda: _card(page, "completed").count() == 2, 120, "the image-to-video job")

        # What a number input cannot read (`1e`, `7,5`) reads as empty: it is named, not silently dropped.
        page.fill("#guidance_scale", "")
        page.focus("#guidance_scale")
        page.keyboard.type("1e")
        page.click("#generate")
        assert "guidance_scale: must be a number" in page.text_content("#create-error")
        page.fill("#guidance_scale", "")

        # Settings typed stay when another model is chosen, where it takes them (they were all cleared, without a
        # word); what it cannot take is cleared, and said.
        _fill(page, {"#num_frames": "5", "#num_inference_steps": "2", "#size": "63x64"})
        page.select_option("#model", "tiny-t2v")
        assert page.input_value("#num_frames") == "5" and page.input_value("#num_inference_steps") == "2"
        assert page.input_value("#size") == "" and "size cleared" in page.text_content("#announcer")

        # A job waiting behind a slow one is cancelled from its card; the slow one then deleted.
        # Once it ends, nothing runs: the queue line is read again as the card says so (it went on saying
        # "1 running" for up to 10 s, the idle pace, from a read made before the video ended).
        reads: list[str] = []

        def note(response: Any) -> None:
            if "/v1/models" in response.url:
                reads.append("models")
            elif "/v1/videos?" in response.url:
                # Its place is taken as it arrives: reading the body lets later responses' handlers run first.
                at = len(reads)
                reads.append("list")
                if any(
                    video["prompt"] == "slow one" and video["status"] == "completed"
                    for video in response.json()["data"]
                ):
                    reads[at] = "list: completed"

        page.on("response", note)
        _fill(page, {"#prompt": "slow one", **SLOW})
        page.click("#generate")
        _fill(page, {"#prompt": "waiting one"})
        page.click("#generate")
        waiting = page.locator(".job", has_text="waiting one")
        waiting.locator(".detail", has_text="in the queue").wait_for()
        # The queue line under the model counts them with the cards: while videos run it is read again every
        # other refresh (2 s apart), where it lagged up to 10 s, ten refreshes: counted in refreshes below, not
        # seconds here (a loaded CI machine took over 9 s).
        _wait_for_queue_line(page, site, "1 video waiting · 1 running")
        waiting.locator("button.cancel").focus()
        page.keyboard.press("Enter")  # from the keyboard: the button goes, and the focus must not go with it
        page.locator(".job[data-status=cancelled]", has_text="waiting one").wait_for()
        where = page.evaluate(
            "() => [document.activeElement.className, document.activeElement.closest('.job')?.textContent]"
        )
        assert "delete" in where[0] and "waiting one" in where[1], where
        # Deleted elsewhere meanwhile (another tab, the API) while its card holds the focus: the card goes at the
        # next refresh (or at its own Delete's 404), says so, and hands the focus on, where it vanished silently
        # and the focus fell to the page's body.
        waiting_id = waiting.get_attribute("data-id")
        assert httpx.delete(f"{site.url}/v1/videos/{waiting_id}").status_code == 200
        waiting.wait_for(state="detached")
        # (with whatever else that refresh said, such as the slow one completing: said together, not lost)
        assert "video no longer exists" in page.text_content("#announcer")
        where = page.evaluate(
            "() => [document.activeElement.className, document.activeElement.closest('.job')?.textContent]"
        )
        assert "delete" in where[0] and "slow one" in where[1], where
        slow = page.locator(".job", has_text="slow one")
        slow_id = slow.get_attribute("data-id")
        page.locator(".job[data-status=completed]", has_text="slow one").wait_for(timeout=240_000)
        _wait_for_queue_line(page, site, "0 videos waiting · 0 running")
        page.remove_listener("response", note)
        assert "models" in reads[reads.index("list: completed") :], reads
        lists_in_a_row = max(map(len, "".join("M" if r == "models" else "L" for r in reads).split("M")))
        assert lists_in_a_row <= 4, reads  # 2 at the busy pace; 10 at the idle one
        slow.locator("button.delete").click()
        slow.wait_for(state="detached")
        assert httpx.get(f"{site.url}/v1/videos/{slow_id}").status_code == 404

        # On a phone nothing runs off the screen, settings open.
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(200)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        site.process.stop()


@browser_only
@pytest.mark.slow
def test_with_api_keys_the_page_asks_for_one_and_plays_videos_with_it(
    page: Any, tmp_path: Path, tiny_cache: Path
) -> None:
    # A passphrase: the server takes inner spaces (printable ASCII), and the page refused them. Served `fastest`,
    # on a machine that takes no FP8: the card says so, where the name alone said it was all applied.
    site = Site(tmp_path, tiny_cache, WANSERVE_API_KEY="correct horse battery", WANSERVE_PRESET="fastest")
    try:
        page.goto(site.url)
        page.locator("#key-form").wait_for()
        assert page.is_hidden("#create")
        page.fill("#key", "pasted\u200bkey")  # a zero-width space from a chat window could never be sent
        page.click("#key-form button[type=submit]")
        assert "printable ASCII" in page.text_content("#key-error")
        page.fill("#key", "wrong-key")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("() => document.querySelector('#key-error').textContent !== ''")
        # A key the server refused is not kept for the next visit.
        assert page.evaluate("[localStorage.length, sessionStorage.length]") == [0, 0]
        page.fill("#key", " correct horse battery\n")  # the ends trimmed, as the server trims a key
        page.press("#key", "Enter")
        page.locator("#create").wait_for()
        assert page.evaluate("document.activeElement.id") == "prompt"  # not lost with the key form
        _fill(page, {"#prompt": "a fox", "#num_frames": "5", "#num_inference_steps": "2"})
        page.click("#generate")
        # A media element cannot send the key: the page fetches the thumbnail with it at once, and the MP4 (tens
        # of MB on a real model) when asked, and plays it from memory.
        play = _card(page, "completed").locator("button.play")
        play.wait_for()
        assert play.locator("img").get_attribute("src").startswith("blob:")
        assert re.search(r"fastest, \d+% of steps reused, without FP8 here", page.text_content(".job .detail"))
        play.click()
        video = _card(page, "completed").locator("video")
        video.wait_for()
        assert video.get_attribute("src").startswith("blob:")
        page.wait_for_function("() => document.querySelector('.job video').duration > 0")
        # The key is remembered across a reload, and can be forgotten.
        page.reload()
        _card(page, "completed").wait_for()
        page.click("#forget-key")
        page.locator("#key-form").wait_for()
        assert page.locator(".job").count() == 0
    finally:
        site.process.stop()


def _cancelled_jobs(tmp_path: Path, prompts: list[str]) -> None:
    """Jobs in the store the site will use, oldest first, cancelled while queued: listed, and never run."""
    from wanserve.jobs.model import Job, new_job_id
    from wanserve.jobs.sqlite import SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "data" / "jobs.db")
    for prompt in prompts:
        job = store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": prompt}))
        store.request_cancel(job.id, ttl=3600)
    store.close()


@browser_only
def test_every_video_stays_reachable_past_the_lists_largest_page(page: Any, tmp_path: Path, tiny_cache: Path) -> None:
    """The page read at most one list page of 100: "Show older" vanished there, and older videos, a queued one
    among them, could not be seen, cancelled or deleted from the page."""
    _cancelled_jobs(tmp_path, [f"video {n}" for n in range(130)])
    site = Site(tmp_path, tiny_cache)
    try:
        page.goto(site.url)
        page.locator(".job").first.wait_for()
        more = page.locator("#more")
        while more.is_visible():
            shown = page.locator(".job").count()
            more.click()
            page.wait_for_function(f"() => document.querySelectorAll('.job').length > {shown}")
        assert page.locator(".job").count() == 130
        assert page.locator(".job .prompt", has_text="video 0").count() == 1  # the oldest
        assert page.evaluate("document.activeElement.classList.contains('delete')")  # where reading had got to
    finally:
        site.process.stop()


@browser_only
def test_a_video_pushed_past_the_first_page_is_not_said_to_be_gone(page: Any, tmp_path: Path, tiny_cache: Path) -> None:
    """A newer video pushes the oldest card off the page's 20: it was announced as "video no longer exists",
    to whoever was on it, though it was only under Show older."""
    import httpx

    _cancelled_jobs(tmp_path, ["the oldest", *(f"video {n}" for n in range(19))])
    # No worker: the new video stays queued, and no "completed" said a second later replaces what is checked.
    site = Site(tmp_path, tiny_cache, role="api")
    try:
        page.goto(site.url)
        card = page.locator(".job", has_text="the oldest")
        card.locator(".delete").focus()
        created = httpx.post(f"{site.url}/v1/videos", json={"prompt": "made elsewhere", "seed": 1}, timeout=30)
        assert created.status_code == 200, created.text
        card.wait_for(state="detached")
        assert "video moved under Show older" in page.locator("#announcer").text_content()
        assert "no longer exists" not in page.locator("#announcer").text_content()
        assert page.locator("#more").is_visible()
        assert page.evaluate("document.activeElement.classList.contains('delete')")  # handed on, not lost
        # The speed hint speaks of the presets offered here only (on a CPU: no 8-bit maths, so no fastest).
        offered = page.locator("#preset option").evaluate_all("options => options.map(o => o.textContent)")
        hint = page.locator("#preset-hint").text_content()
        assert ("8-bit" in hint) == any("fastest" in text for text in offered), (offered, hint)
    finally:
        site.process.stop()


@browser_only
def test_a_cancel_under_way_a_lost_video_and_a_lost_answer_are_told(
    page: Any, tmp_path: Path, tiny_cache: Path
) -> None:
    """A running video's Cancel answered as a refresh would (in progress, Cancel still offered): on a real model a
    step takes seconds, and the user pressed it again, unsure. A finished video whose file had gone said "the
    browser could not play it", with a Try again that could never work. A create whose answer was lost (the
    connection dropped after the server took it) made a second video when Generate was pressed again."""
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.base import VIDEO, key_for

    # An API with no worker: the test plays the worker, so a cancel waits as one does behind a long step.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["api", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model", "tiny-t2v"]
    process = Process(args, base_env(tiny_cache), tmp_path / "api.log")
    store = SQLiteJobStore(tmp_path / "data" / "jobs.db")
    try:
        wait_ready(url, process)
        made = [httpx.post(f"{url}/v1/videos", json={"prompt": p}).json()["id"] for p in ("file lost", "held")]
        for job_id in made:
            job = store.claim("tiny-t2v", "test-worker", lease_seconds=3600)
            assert job is not None and job.id == job_id
            assert store.set_progress(job_id, "test-worker", 0.4, "denoise")
        request = store.get(made[0]).request
        result = {k: request[k] for k in ("seed", "width", "height", "num_frames", "fps")}
        result.update(seconds=1, video_key=key_for(made[0], VIDEO), thumbnail_key=None)
        assert store.complete(made[0], "test-worker", result, 3600)  # and its file never stored (or gone since)

        page.goto(url)
        held = page.locator(".job", has_text="held")
        held.locator("button.cancel").click()
        held.locator(".detail", has_text="cancelling: it stops after the current step").wait_for()
        assert held.locator("button.cancel").is_disabled()
        assert "cancel requested" in page.text_content("#announcer")
        assert held.get_attribute("data-status") == "in_progress"

        lost = page.locator(".job", has_text="file lost")
        lost.locator(".error", has_text="no longer stored").wait_for()
        assert "could not play" not in lost.text_content() and lost.locator("button", has_text="Try again").is_hidden()

        # A proxy's own 503 page (HTML): its status line alone said nothing of what to do.
        def proxy_down(route: Any) -> None:
            if route.request.method != "POST":
                route.continue_()
                return
            route.fulfill(status=503, content_type="text/html", body="<html><body>503</body></html>")

        page.route("**/v1/videos", proxy_down)
        page.fill("#prompt", "through a proxy")
        page.click("#generate")
        page.wait_for_function("() => /try again shortly/.test(document.querySelector('#create-error').textContent)")
        assert "503 Service Unavailable: the server, or a proxy before it, is unavailable" in page.text_content(
            "#create-error"
        )
        page.unroute("**/v1/videos")

        # The first create's answer is lost after the server took it; Generate again sends the same key, and
        # the error says it is safe to. Sent from the prompt with Ctrl+Enter, as a keyboard user would.
        dropped: list[str] = []

        def drop_answer(route: Any) -> None:
            if not dropped:
                dropped.append(route.fetch().status and route.request.headers["idempotency-key"])
                route.abort()
            else:
                route.continue_()

        page.route(
            "**/v1/videos", lambda route: drop_answer(route) if route.request.method == "POST" else route.continue_()
        )
        page.fill("#prompt", "sent twice")
        page.press("#prompt", "Control+Enter")
        page.wait_for_function("() => /cannot be reached/.test(document.querySelector('#create-error').textContent)")
        assert "pressing Generate again will not make a second one" in page.text_content("#create-error")
        page.press("#prompt", "Control+Enter")
        page.locator(".job", has_text="sent twice").wait_for()
        listed = httpx.get(f"{url}/v1/videos", params={"limit": 100}).json()["data"]
        assert [v["prompt"] for v in listed].count("sent twice") == 1
        assert "through a proxy" not in [v["prompt"] for v in listed]
        assert dropped[0].startswith("page-")
    finally:
        store.close()
        process.stop()
