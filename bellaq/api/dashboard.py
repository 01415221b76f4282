"""``GET /dashboard``: one server-rendered page whose script calls the JSON API with the visitor's key.

The page itself needs no key and holds no data: everything it shows is fetched by the browser with
``Authorization: Bearer``. Its assets live in ``bellaq/assets`` (not ``static``, which would give the
whole app a ``/static`` route) and are served under ``/dashboard/assets``.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request

from bellaq.api.openapi import PAGE, operation

bp = Blueprint("dashboard", __name__, template_folder="../templates", static_folder="../assets",
               static_url_path="/dashboard/assets")

# Only this origin's own scripts, styles and API; no inline code, no framing, no form posts (the key
# form is handled by the script, so a submit must never navigate and carry the key anywhere).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@operation("The dashboard: queues, batches and tasks as the key entered sees them", tag="Pages",
           dependencies=False, responses={200: PAGE})
@bp.get("/dashboard")
def page() -> str:
    return render_template("dashboard.html", api_root=request.script_root)


@bp.after_request
def _lock_down(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-cache")
    return response
