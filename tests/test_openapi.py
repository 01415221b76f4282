"""``GET /v1/openapi.json``: a valid OpenAPI 3.1 document of exactly the routes the app serves, with
the roles each one allows; ``GET /docs``: Swagger UI rendering it from bellaq's own assets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from bellaq.api.openapi import openapi_path, rule_methods
from tests.test_dashboard import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, assets, parse


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The document and the pages touch no data; the routes they describe are tested on both databases.
    return f"sqlite:///{tmp_path / 'bellaq.db'}"


ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def operations(document: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item
            if method != "parameters"}


def test_every_route_of_the_url_map_is_documented_and_nothing_else(app, client):
    resp = client.get("/v1/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    document = resp.json
    validate(document)
    assert document["openapi"] == "3.1.0"
    served = {(method, openapi_path(rule.rule)) for rule in app.url_map.iter_rules() for method in rule_methods(rule)}
    assert operations(document) == served
    assert len(served) >= 30


def test_every_path_parameter_is_declared_with_the_length_bellaq_accepts(client):
    document = client.get("/v1/openapi.json").json
    for path, item in document["paths"].items():
        declared = {p["name"]: p for p in item.get("parameters", [])}
        assert set(declared) == set(re.findall(r"{([^}]+)}", path)), path
        assert all(p["in"] == "path" and p["required"] and p["schema"]["maxLength"] == 256 for p in declared.values())


def test_every_error_a_route_documents_is_the_envelope(client):
    document = client.get("/v1/openapi.json").json
    responses = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method, op in ((m, o) for m, o in item.items() if m != "parameters"):
            for status, response in op["responses"].items():
                if int(status) < 400 or path == "/healthz":
                    continue
                response = responses[response["$ref"].rsplit("/", 1)[1]] if "$ref" in response else response
                assert response["content"] == ERROR, (method, path, status)


def test_the_document_needs_no_key_and_names_its_server(client):
    assert client.get("/v1/openapi.json", headers={"Authorization": "Bearer nonsense"}).status_code == 200
    assert client.get("/v1/openapi.json").json["servers"] == [{"url": "/"}]
    behind_a_prefix = client.get("/v1/openapi.json", environ_overrides={"SCRIPT_NAME": "/bellaq"})
    assert behind_a_prefix.json["servers"] == [{"url": "/bellaq"}]


def test_the_roles_an_operation_lists_are_exactly_those_it_lets_in(client, admin, make_key):
    """Each key role calls each operation (with no body): a listed role gets past the role check,
    any other gets 403; an operation with no security needs no key."""
    keys = {"admin": admin, "user": make_key("user"), "worker": make_key("worker")}
    document = client.get("/v1/openapi.json").json
    values = {"name": "nope:0", "filename": "nope.js"}
    checked = 0
    for path, item in document["paths"].items():
        url = re.sub(r"{([^}]+)}", lambda m: values.get(m.group(1), "nope"), path)
        for method, op in ((m, o) for m, o in item.items() if m != "parameters"):
            if not op["security"]:
                assert client.open(url, method=method.upper()).status_code != 401, (method, path)
                continue
            allowed = set(op["security"][0]["bearer"])
            assert client.open(url, method=method.upper()).status_code == 401, (method, path)
            for role, headers in keys.items():
                status = client.open(url, method=method.upper(), headers=headers).status_code
                assert (status == 403) == (role not in allowed), (method, path, role, status)
                assert str(status) in op["responses"], (method, path, role, status)
                checked += 1
    assert checked >= 3 * 25


# ---------------------------------------------------------------------------------------- /docs

def assert_locked_down(resp) -> None:
    """Only this origin, as on the dashboard, but for ``data:`` images (Swagger UI's icons)."""
    directives = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
    for name in ("default-src", "script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'", name
    assert directives["img-src"] == "'self' data:"
    assert directives["form-action"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'" and directives["base-uri"] == "'none'"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"

def test_the_docs_page_needs_no_key_loads_only_its_own_assets_and_is_locked_down(client):
    resp = client.get("/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert_locked_down(resp)
    html = resp.get_data(as_text=True)
    tags = parse(html)
    assert not tags.inline_script and not re.search(r"https?:|//[A-Za-z0-9]", html)
    found = assets(html)
    assert sorted(Path(a).name for a in found) == ["docs.css", "docs.js", "favicon-32x32.png", "swagger-ui-bundle.js",
                                                   "swagger-ui.css"]
    for url in found:
        assert url.startswith("/docs/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.data) > 50, url
        assert_locked_down(asset)


@pytest.mark.parametrize("path", ["/docs/assets/index.css", "/docs/assets/oauth2-redirect.html",
                                  "/docs/assets/..%2Fdocs.py", "/docs/assets/%2e%2e", "/docs/assets/dashboard.js"])
def test_the_docs_page_serves_no_other_file(client, path):
    resp = client.get(path)
    assert resp.status_code == 404 and resp.json["error"]["code"] == "not_found"


@pytest.mark.slow
def test_swagger_ui_renders_every_operation_in_a_real_browser(live_server, client, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.conftest import wait_for

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(live_server.url + "/docs")
        expected = len(operations(client.get("/v1/openapi.json").json))
        wait_for(lambda: len(driver.find_elements("css selector", ".opblock")) == expected, timeout=30,
                 message=f"{expected} operations on the page")
        assert driver.find_element("css selector", ".info .title").text.startswith("bellaq")
        # Try it out: the page calls the API of its own origin, which the policy allows.
        health = driver.find_element("id", "operations-Pages-health_healthz")
        health.find_element("css selector", ".opblock-summary").click()
        wait_for(lambda: health.find_elements("css selector", ".try-out__btn"), message="Try it out")
        health.find_element("css selector", ".try-out__btn").click()
        health.find_element("css selector", ".execute").click()
        answer = ".live-responses-table tbody .response-col_status"
        status = wait_for(lambda: [e.text for e in health.find_elements("css selector", answer)], message="the answer")
        assert status[0].startswith("200")
        driver.save_screenshot(str(tmp_path / "docs.png"))
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert problems == []
    finally:
        driver.quit()
