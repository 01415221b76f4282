"""``GET /dashboard``: the page and its assets are served by bellaq itself, need no key, load nothing
from elsewhere, and are locked down by a Content-Security-Policy that allows only this origin."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service

from bellaq.batches.ids import task_id_for
from tests.batch_fixtures import chat_line, create_batch, jsonl
from tests.conftest import wait_for


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The page touches no database and the API it calls is tested on both elsewhere: SQLite is enough.
    return f"sqlite:///{tmp_path / 'bellaq.db'}"


class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] in ("script", "style") and data.strip():
            self.inline_script = True


def parse(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    return tags


def assets(html: str) -> list[str]:
    return [attrs.get("src") or attrs.get("href") or "" for tag, attrs in parse(html).tags
            if tag in ("script", "link")]


def assert_locked_down(resp) -> None:
    csp = resp.headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'self'"
    for name in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[name] == "'self'", name
    assert directives["form-action"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp and "*" not in csp and "http" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_the_page_needs_no_key_and_is_locked_down(client):
    resp = client.get("/dashboard")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert_locked_down(resp)
    # An Authorization header changes nothing: the page holds no data, the browser fetches it.
    assert client.get("/dashboard", headers={"Authorization": "Bearer nonsense"}).data == resp.data


def test_the_assets_are_served_by_bellaq_with_their_content_types(client):
    html = client.get("/dashboard").get_data(as_text=True)
    found = assets(html)
    assert sorted(Path(a).name for a in found) == ["dashboard.css", "dashboard.js"]
    types = {}
    for url in found:
        assert url.startswith("/dashboard/assets/"), url
        resp = client.get(url)
        assert resp.status_code == 200, url
        assert_locked_down(resp)
        types[Path(url).suffix] = resp.mimetype
    assert types[".css"] == "text/css"
    assert types[".js"] in ("text/javascript", "application/javascript")


def test_nothing_is_loaded_from_another_host(client):
    html = client.get("/dashboard").get_data(as_text=True)
    texts = {"/dashboard": html} | {url: client.get(url).get_data(as_text=True) for url in assets(html)}
    for url, text in texts.items():
        assert not re.search(r"https?:|//[A-Za-z0-9]|@import", text), url
    tags = parse(html)
    # Inline code would be blocked by the policy anyway; the page must not need any.
    assert not tags.inline_script
    for tag, attrs in tags.tags:
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs), tag
        if tag == "script":
            assert attrs.get("src", "").startswith("/dashboard/assets/")


def test_the_script_never_parses_api_data_as_html(client):
    html = client.get("/dashboard").get_data(as_text=True)
    script = client.get(next(a for a in assets(html) if a.endswith(".js"))).get_data(as_text=True)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"on", "new EventSource"):
        assert sink not in script, sink
    # The key goes in a header, never in a URL or anywhere but this tab's session storage.
    assert "localStorage" not in script and "?key=" not in script
    assert "Authorization: `Bearer ${state.key}`" in script


@pytest.mark.parametrize("path", ["/dashboard/assets/../api/dashboard.py", "/dashboard/assets/%2e%2e/config.py",
                                  "/dashboard/assets/missing.js", "/static/dashboard.js"])
def test_nothing_else_is_served(client, path):
    resp = client.get(path)
    assert resp.status_code == 404
    assert resp.json["error"]["code"] == "not_found"


def test_the_key_form_cannot_be_posted(client):
    resp = client.post("/dashboard", data={"key": "bq-secret"})
    assert resp.status_code == 405 and resp.json["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- in a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# This machine has no network: without these flags Chromium's own background connections fail.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


class Dashboard:
    """The page in headless Chromium, driven through Debian's chromedriver."""

    def __init__(self, base_url: str, tmp_path: Path) -> None:
        self.downloads = tmp_path / "downloads"
        self.downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
            options.add_argument(flag)
        options.add_experimental_option("prefs", {"download.default_directory": str(self.downloads),
                                                  "download.prompt_for_download": False})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.get(base_url + "/dashboard")

    def quit(self) -> None:
        self.driver.quit()

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def submit(self, form_id: str, input_id: str, text: str) -> None:
        self.driver.find_element("id", input_id).send_keys(text)
        self.driver.find_element("css selector", f"#{form_id} button[type=submit]").click()

    def sign_in(self, headers: dict[str, str]) -> None:
        self.submit("key-form", "key-input", headers["Authorization"].split(" ", 1)[1])
        wait_for(lambda: self.js("return !document.getElementById('panels').hidden"), message="the panels")

    def row(self, key: str) -> dict | None:
        """A table row's cells as text and its data attributes, or None while it is not shown."""
        return self.js("""
            const tr = [...document.querySelectorAll('tbody tr')].find((r) => r.dataset.key === arguments[0]);
            if (!tr) return null;
            const ok = tr.querySelector('.bar .ok');
            return {...tr.dataset, cells: [...tr.children].map((c) => c.textContent), width: ok && ok.style.width};
        """, key)

    def click_in_row(self, key: str, selector: str, confirm: bool = False) -> None:
        row = next(r for r in self.driver.find_elements("css selector", "tbody tr")
                   if r.get_attribute("data-key") == key)
        row.find_element("css selector", selector).click()
        if confirm:
            wait_for(self._accept_alert, message="the confirmation dialog")

    def _accept_alert(self) -> bool:
        try:
            self.driver.switch_to.alert.accept()
        except NoAlertPresentException:
            return False
        return True

    def policy_violations(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if "Content Security Policy" in e["message"]]

    def screenshot(self, tmp_path: Path) -> Path:
        path = tmp_path / "dashboard.png"
        self.driver.save_screenshot(str(path))
        if os.environ.get("BELLAQ_TEST_SCREENSHOT"):
            shutil.copyfile(path, os.environ["BELLAQ_TEST_SCREENSHOT"])
        return path


@pytest.fixture
def dashboard(live_server, tmp_path: Path):
    page = Dashboard(live_server.url, tmp_path)
    yield page
    page.quit()


@pytest.mark.slow
def test_a_user_follows_a_batch_cancels_it_and_looks_up_a_task(app, user, settings, mock_upstream, celery_worker,
                                                                dashboard, tmp_path):
    settings.worker_take_size = 1  # four lines at a time, so the batch runs for a while
    mock_upstream.state.latency = 0.3
    lines = [chat_line(f"r{i}") for i in range(300)]
    for line in lines[::10]:
        line["body"]["mock_status"] = 400
    lines[1]["body"]["messages"][0]["content"] = HOSTILE
    api = app.test_client()
    batch_id = create_batch(api, user, jsonl(lines), metadata={"note": HOSTILE})["id"]

    dashboard.sign_in(user)
    widths: set[str] = set()

    def bar_moved() -> bool:
        row = dashboard.row(batch_id)
        if row and row["status"] == "in_progress" and row["width"] not in ("", "0%"):
            widths.add(row["width"])
        return len(widths) >= 2

    wait_for(bar_moved, timeout=30, interval=0.1, message="the bar to move")
    dashboard.click_in_row(batch_id, "button.cancel", confirm=True)
    row = wait_for(lambda: (r := dashboard.row(batch_id)) and r["status"] == "cancelled" and r, timeout=30,
                   message="the batch to show cancelled")
    counts = api.get(f"/v1/batches/{batch_id}", headers=user).json["request_counts"]
    assert (int(row["completed"]), int(row["failed"]), int(row["total"])) == (
        counts["completed"], counts["failed"], 300)
    assert 0 < counts["completed"] < 270 and counts["completed"] + counts["failed"] == 300
    assert row["cells"][4]  # finished time

    # The attacker-controlled metadata is shown as text and runs nothing.
    assert HOSTILE in row["cells"][0]
    assert dashboard.js("return [window.pwned, document.images.length, document.scripts.length]") == [None, 0, 1]

    # The output file is downloaded with the key (through a Blob URL), byte for byte.
    output_id = api.get(f"/v1/batches/{batch_id}", headers=user).json["output_file_id"]
    dashboard.click_in_row(batch_id, "td.files button")
    saved = dashboard.downloads / f"{batch_id}_output.jsonl"
    wait_for(saved.exists, message="the download")
    assert saved.read_bytes() == api.get(f"/v1/files/{output_id}/content", headers=user).data

    task_id = task_id_for(batch_id, 1)
    dashboard.submit("task-form", "task-input", task_id)
    shown = wait_for(lambda: dashboard.js("return document.getElementById('task-view').textContent"),
                     message="the task")
    task = json.loads(shown)
    assert task == api.get(f"/v1/queue/{task_id}", headers=user).json
    assert task["batch_id"] == batch_id and task["data"]["messages"][0]["content"] == HOSTILE
    # A user key cannot read every queue; the looked-up task's queue is watched instead.
    queue_row = wait_for(lambda: (r := dashboard.row(f"{task['queue']}:1")) and r["cells"][7] and r,
                         message="the task's queue and its limits")
    assert queue_row["cells"][:2] == [task["queue"], "1"] and queue_row["cells"][7] == "none"

    dashboard.screenshot(tmp_path)
    assert dashboard.policy_violations() == []


@pytest.mark.slow
def test_an_admin_sees_every_queue_with_its_limits_and_clears_a_level(app, admin, dashboard, tmp_path):
    api = app.test_client()
    register = {"queue": "held", "endpoint": "/v1/chat/completions", "builtin": False, "rpm": 60, "max_in_flight": 2}
    assert api.post("/v1/queue/register", json=register, headers=admin).status_code == 200
    put = {"endpoint": "/v1/chat/completions", "queue": "held", "level": 2, "callback_url": "http://127.0.0.1:9/",
           "data": {"model": "m", "messages": []}}
    ids = [api.post("/v1/queue/put", json=put, headers=admin).json["data"] for _ in range(3)]

    dashboard.sign_in(admin)
    assert dashboard.js("return document.getElementById('key-role').textContent") == "admin key"
    row = wait_for(lambda: (r := dashboard.row("held:2")) and r["cells"][7] and r, message="the queue and its limits")
    assert row["cells"][:3] == ["held", "2", "3"] and row["cells"][7] == "rpm 60 · max_in_flight 2"
    assert row["cells"][5].endswith(("ms", "s"))  # the oldest task's age

    dashboard.click_in_row("held:2", "button.danger", confirm=True)
    wait_for(lambda: dashboard.row("held:2")["cells"][2] == "0", message="the level to be cleared")
    assert dashboard.js("return document.getElementById('notice').textContent") == \
        "Cleared 3 waiting task(s) of held:2."
    assert {api.get(f"/v1/queue/{i}", headers=admin).json["status"] for i in ids} == {"cancelled"}
    assert dashboard.policy_violations() == []
