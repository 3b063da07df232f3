"""A real S3-protocol server for the artifact-store tests: moto's standalone server (`moto_server`, from the
test extra's moto[s3] with flask and flask-cors) in its own process on a free loopback port, stopped at the end.

Processes reach it as a user's processes reach any S3 endpoint that is not AWS (MinIO, Ceph, a cloud's own):
through their environment, `AWS_ENDPOINT_URL` and the credentials, which boto3 reads by itself; the run
records only `s3://BUCKET/PREFIX`. The objects live in the server's memory: nothing is written to disk and
nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from support.postgres import free_port
from support.processes import stop_process

START_SECONDS = 60.0  # moto imports Flask and its S3 backend: ~2 s alone, longer beside a busy test suite


@dataclass
class S3Server:
    """A running server: its endpoint, the environment a client process needs, and a client of the test's."""

    endpoint: str

    def env(self) -> dict[str, str]:
        """What a user's shell would export for this endpoint (the credentials are any non-empty pair)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "mnv3-test",
                "AWS_SECRET_ACCESS_KEY": "mnv3-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, name: str) -> str:
        """Create bucket `name` (3-63 lower-case letters, digits, dashes) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted (the tests' own look into the bucket)."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)


def moto_server_command() -> list[str]:
    """moto's server as installed beside this interpreter (the venv's console script)."""
    script = Path(sys.executable).parent / "moto_server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def running_s3() -> Iterator[S3Server]:
    """Start moto's server on 127.0.0.1 and a free port, yield it once it accepts connections, stop it."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="mnv3-moto-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen([*moto_server_command(), "-H", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _listening(port):
            assert proc.poll() is None, f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"moto_server did not listen in {START_SECONDS:.0f} s"
            time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)
