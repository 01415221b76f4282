"""bellaq's WSGI app plus one route that exists only for the benchmarks' comparison.

``POST /bench/anchor`` authenticates exactly as the API does (``@require("user")``: the same key
lookup), reads the JSON body with the same strict reader, runs one EVALSHA of a trivial Lua
script and answers like a put. Web CPU per put is compared with web CPU per call of this route on
the same gunicorn (``scripts/bench_aims.py``). Served with
``gunicorn scripts.bench_anchor_app:app``; never part of the product.
"""

from workers.wsgi import app  # noqa: I001  (first: gevent patches before anything else loads)

from flask import jsonify

from bellaq.auth import require
from bellaq.services import services
from bellaq.validation import json_body

_SCRIPT = "return 1"
_sha: list[str] = []


@require("user")
def anchor():  # noqa: ANN201 - a Flask view
    body = json_body()
    svc = services()
    if not _sha:
        _sha.append(svc.redis.script_load(_SCRIPT))
    svc.redis.evalsha(_sha[0], 1, svc.key("bench", "anchor"))
    return jsonify({"code": 200, "data": str(len(body))})


app.add_url_rule("/bench/anchor", "bench_anchor", anchor, methods=["POST"])
