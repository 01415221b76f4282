"""``bellaq batch``: submit, watch and resubmit follow a batch's event stream, with nothing installed
beyond bellaq itself (no ``openai`` package), and keep their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from bellaq.cli import main
from tests.batch_fixtures import (  # noqa: F401  (ext_queue is a fixture)
    CHAT,
    QUEUE,
    assert_each_custom_id_once,
    chat_line,
    complete,
    create_batch,
    ext_queue,
    jsonl,
    read_jsonl,
    take,
    until_status,
    wait_for,
)

# The command as a plain `pip install bellaq` has it: importing openai fails.
WITHOUT_OPENAI = "import sys; sys.modules['openai'] = None; from bellaq.cli import main; main(prog_name='bellaq')"


def cli_env(live_server, user) -> dict[str, str]:
    return {"BELLAQ_BASE_URL": live_server.url + "/v1", "BELLAQ_API_KEY": user["Authorization"].split()[1]}


def bellaq(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_OPENAI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_follows_the_batch_and_downloads_results(live_server, user, celery_worker, tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [chat_line(f"cli-{i}") for i in range(20)]
    lines[3]["body"]["mock_status"] = 400
    path.write_bytes(jsonl(lines))
    env = cli_env(live_server, user)
    result = bellaq(env, "batch", "submit", str(path), "--endpoint", CHAT, "--wait", "--metadata", "run=cli")
    assert result.returncode == 0, result.stderr
    batch_id = result.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("batch_")
    assert "19 completed, 1 failed, 20 total" in result.stdout
    assert any("20/20 (19 ok, 1 failed)" in line and line.endswith("completed") for line in result.stderr.splitlines())
    out = read_jsonl((tmp_path / "prompts.output.jsonl").read_bytes())
    err = read_jsonl((tmp_path / "prompts.errors.jsonl").read_bytes())
    assert_each_custom_id_once(out, err, {f"cli-{i}" for i in range(20)})
    assert [e["custom_id"] for e in err] == ["cli-3"]

    status = CliRunner().invoke(main, ["batch", "status", batch_id, "--json"], env=env)
    assert status.exit_code == 0 and json.loads(status.stdout)["metadata"] == {"run": "cli"}
    missing = CliRunner().invoke(main, ["batch", "status", "batch_nope"], env=env)
    assert missing.exit_code == 1 and "404" in missing.output
    watched = CliRunner().invoke(main, ["batch", "watch", batch_id], env=env)
    assert watched.exit_code == 0 and f"{batch_id}: completed" in watched.stdout

    again = CliRunner().invoke(main, ["batch", "resubmit", batch_id, "--wait"], env=env)
    assert again.exit_code == 0, again.output
    assert "0 completed, 1 failed, 1 total" in again.stdout  # the line that failed fails again
    new_id = again.stdout.strip().splitlines()[-1]
    assert new_id.startswith("batch_") and new_id != batch_id
    nothing = CliRunner().invoke(main, ["batch", "resubmit", batch_id, "--lines", "expired"], env=env)
    assert nothing.exit_code == 1 and "400" in nothing.output and "no expired lines" in nothing.output


def test_watch_exits_1_for_a_cancelled_batch(live_server, client, user, worker, ext, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line(f"c{i}") for i in range(3)]), extra_headers=QUEUE)
    env = cli_env(live_server, user)
    watcher = subprocess.Popen([sys.executable, "-c", WITHOUT_OPENAI, "batch", "watch", batch["id"]],
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until_status(client, user, batch["id"], "in_progress")
        complete(client, worker, take(client, worker, 1)[0])
        assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=user).status_code == 200
        stdout, stderr = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 1, stderr
    assert f"{batch['id']}: cancelled - 1 completed, 2 failed, 3 total" in stdout
    assert "error_file_id" in stdout


def test_progress_line_fits_and_says_everything():
    from bellaq.cli_batch import progress_line

    line = progress_line("in_progress", 300, 20, 1000, 80.0, 100)
    assert "320/1000" in line and "300 ok, 20 failed" in line and "80 req/s" in line and "ETA 0:00:08" in line
    assert len(line) < 100 and line.startswith("[")
    assert "[" in progress_line("validating", 0, 0, 0, None, 30)
