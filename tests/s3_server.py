"""A real S3-compatible HTTP server (moto's standalone server, a subprocess on 127.0.0.1) for the session.

A subprocess rather than moto's in-process server: importing moto patches botocore's handler list,
an in-process server hangs forever when its port cannot be bound, and the code under test (and the
CLI subprocesses) must reach the store exactly as they would a real one, over HTTP. The port is
chosen by the OS (`-p 0`) and read from the server's log; the log goes to a file, never to a pipe
that could fill up and freeze the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")

# Variables that could make boto/s3fs use something other than our server and dummy keys.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL_S3",  # the service-specific one would win over AWS_ENDPOINT_URL
    "FSSPEC_S3",
    "FSSPEC_S3_ENDPOINT_URL",
)


@dataclass
class S3Server:
    """A running moto server. ``env`` holds the variables a client (or a CLI subprocess) needs."""

    port: int
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- helpers -----------------------------------------------------------------------------
    def client(self):
        """A boto3 S3 client bound explicitly to this server (independent of os.environ)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket through the S3 API; returns its name (a fresh unique one by default)."""
        name = name or f"uwe-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Wipe every bucket and object (moto's own reset endpoint)."""
        urllib.request.urlopen(f"{self.endpoint_url}/moto-api/reset", data=b"", timeout=10).read()

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[None]:
        """Inside the block moto checks signatures against its IAM store: the dummy ``testing`` keys
        (and any key not created through moto's IAM API) get 403 InvalidAccessKeyId / Forbidden.
        Server-wide: don't use it while other tests talk to the same server concurrently."""
        self._set_auth_count("0")
        try:
            yield
        finally:
            self._set_auth_count("inf")

    def _set_auth_count(self, n: str) -> None:
        # text/plain matters: with the default form content type werkzeug swallows the body (HTTP 500)
        req = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=n.encode(),
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        resp = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for o in resp.get("Contents", [])]

    def open_uploads(self, bucket: str) -> list[str]:
        """Keys with an unfinished multipart upload (what a killed writer leaves behind)."""
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # moto.server turns SIGTERM into sys.exit(0)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel SIGTERM the server if the pytest process dies (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def start_s3_server(
    log_dir: str | os.PathLike | None = None, timeout: float = 30.0, server_env: dict[str, str] | None = None
) -> S3Server:
    """Start ``python -m moto.server`` on 127.0.0.1 with an OS-chosen port and wait until it listens.

    ``server_env`` adds variables for the server process only, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}``
    makes moto check every request's access key against its IAM store (so unknown keys get 403).
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="moto-"))
    log_path = log_dir / "moto_server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server_env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    log.close()
    deadline = time.monotonic() + timeout
    port = None
    while time.monotonic() < deadline:
        m = _RUNNING.search(log_path.read_bytes())
        if m:
            port = int(m.group(1))
            break
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.05)
    if port is None:
        proc.kill()
        raise RuntimeError(
            f"moto server did not start within {timeout}s:\n{log_path.read_text(errors='replace')}"
        )
    server = S3Server(port=port, proc=proc, log_path=log_path)
    cfg_none = str(log_dir / "no-aws-config")  # a path that does not exist: ignore ~/.aws
    server.env = {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": cfg_none,
        "AWS_SHARED_CREDENTIALS_FILE": cfg_none,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server.reset()  # first request: proves it answers HTTP
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Session-wide S3 server. os.environ carries its endpoint and dummy keys for the whole session,
    so in-process code (s3fs) and CLI subprocesses (which inherit os.environ) both reach it."""
    server = start_s3_server(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        for var in _AWS_VARS_TO_CLEAR:
            mp.delenv(var, raising=False)
        for k, v in server.env.items():
            mp.setenv(k, v)
        _clear_s3fs_cache()
        try:
            yield server
        finally:
            _clear_s3fs_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.make_bucket()


def _clear_s3fs_cache() -> None:
    """fsspec caches S3FileSystem instances by constructor kwargs, not by os.environ: clear it when env changes."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
