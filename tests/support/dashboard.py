"""optuna-dashboard (the `dashboard` extra) served as a user starts it (`optuna-dashboard STORAGE --port P`, or
`--from-config FILE` to keep a password off the command line), in its own process on a free loopback port, and
read over HTTP through its JSON API (what its pages show)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from support.postgres import free_port
from support.processes import stop_process

START_SECONDS = 60.0  # it imports Optuna, SQLAlchemy and its plotting code: ~3 s alone, more on busy cores


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, (url, response.status)
        return json.load(response)


@contextmanager
def running_dashboard(*storage: str) -> Iterator[str]:
    """`optuna-dashboard STORAGE...` (a URL or journal, or --from-config FILE) on 127.0.0.1 and a free port;
    yields its base URL once it answers."""
    port = free_port()
    script = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(script), *storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert proc.poll() is None, f"optuna-dashboard exited with {proc.returncode}: {proc.communicate()[0]}"
            try:
                get_json(url + "/api/meta")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"optuna-dashboard did not answer in {START_SECONDS:.0f} s"
                time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def dashboard_trials(url: str, study_name: str) -> list[dict[str, Any]]:
    """The trials the dashboard shows for `study_name`, after checking it lists that study once."""
    studies = [s for s in get_json(url + "/api/studies")["study_summaries"] if s["study_name"] == study_name]
    assert len(studies) == 1, studies
    return list(get_json(f"{url}/api/studies/{studies[0]['study_id']}")["trials"])
