"""``GET /v1/openapi.json`` (the OpenAPI document) and ``GET /docs`` (Swagger UI rendering it).

Neither needs a key: the document describes the API, not anyone's data. Swagger UI's files come
from the ``flask-swagger-ui`` package and are served by bellaq under ``/docs/assets`` (only the
ones the page uses), with the page's own script; nothing is loaded from elsewhere, and the
Content-Security-Policy allows nothing but this origin (plus ``data:`` images, which Swagger UI's
style sheet draws its icons with).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, render_template, request, send_from_directory

from bellaq.api import dashboard
from bellaq.api.openapi import ASSET, PAGE, build, operation
from bellaq.errors import NotFound

bp = Blueprint("docs", __name__, template_folder="../templates")

SWAGGER_UI = Path(str(files("flask_swagger_ui") / "dist"))
OWN_ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The files the page loads, and where each one lives.
ASSETS = {"swagger-ui-bundle.js": SWAGGER_UI, "swagger-ui.css": SWAGGER_UI, "favicon-32x32.png": SWAGGER_UI,
          "docs.js": OWN_ASSETS, "docs.css": OWN_ASSETS}

# The dashboard's policy, but for data: images (Swagger UI's style sheet draws its icons with them).
CONTENT_SECURITY_POLICY = dashboard.CONTENT_SECURITY_POLICY.replace("img-src 'self';", "img-src 'self' data:;")


@operation("The OpenAPI document of every route", tag="Pages", dependencies=False, responses={200: {
    "description": "This document", "content": {"application/json": {"schema": {"type": "object"}}}}})
@bp.get("/v1/openapi.json")
def document() -> Response:
    built = current_app.extensions.get("bellaq.openapi")
    if built is None:
        built = current_app.extensions["bellaq.openapi"] = build(current_app)
    # The server is wherever this document was read from (behind a path prefix, too).
    return jsonify({**built, "servers": [{"url": request.script_root or "/"}]})


@operation("This API's documentation (Swagger UI)", tag="Pages", dependencies=False, responses={200: PAGE})
@bp.get("/docs")
def page() -> str:
    return render_template("docs.html")


@operation("A file of the docs page (Swagger UI's script and style sheet, the page's own script)", tag="Pages",
           dependencies=False, errors={404: "No such file."}, responses={200: ASSET})
@bp.get("/docs/assets/<filename>")
def asset(filename: str) -> Response:
    folder = ASSETS.get(filename)
    if folder is None:
        raise NotFound(f"The docs page has no file '{filename[:64]}'.", param="filename")
    return send_from_directory(folder, filename)


@bp.after_request
def _lock_down(response: Response) -> Response:
    """The dashboard's headers, with this page's policy."""
    dashboard._lock_down(response)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
