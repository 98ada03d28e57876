"""A real Label Studio server for the export integration test (standard library only).

Label Studio lives in its own virtual environment (`make ls-venv` builds `.venv-ls`; its pins clash
with uwe's). `label-studio init` runs the Django migrations once into a template data directory
(`python tests/integrations/ls_server.py init VENV TEMPLATE`, done by `make ls-template`); each test
session copies the template and starts `label-studio start` (SQLite) on a free port of 127.0.0.1, in
its own process group, with telemetry, version checks and Sentry off and prediction validation on
(an import whose predictions do not match the labeling config is refused with HTTP 400).

Pitfalls met on the way: `label-studio --version` starts a server; a busy port silently moves to
port + 1 (so the server is checked with `whoami` and our token); `LABEL_STUDIO_DJANGO_DB=default`
means PostgreSQL; token auth needs `LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true` at organisation
creation; un-prefixed variables such as `HOST`, `PORT`, `DEBUG` or `CI` are read too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

USERNAME = "uwe-test@example.com"
PASSWORD = "uwe-test-password"
TOKEN = "uwe0test0token0000000000000000000000000a"  # legacy DRF token (Label Studio needs > 5 chars)
DB_NAME = "label_studio.sqlite3"
CREDENTIALS = "uwe-ls-credentials.json"
LOG_NAME = "ls-server.log"
# Un-prefixed variables Label Studio also reads (LABEL_STUDIO_X, then HEARTEX_X, then X).
_SCRUB = (
    "USERNAME",
    "PASSWORD",
    "USER_TOKEN",
    "HOST",
    "PORT",
    "DEBUG",
    "CI",
    "DATABASE_NAME",
    "DJANGO_DB",
    "BASE_DATA_DIR",
    "LOG_LEVEL",
    "SECRET_KEY",
    "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "REDIS_LOCATION",
    "SENTRY_DSN",
    "JSON_LOG",
)


class LabelStudioError(RuntimeError):
    """The server could not be built, started or reached."""


def executable(venv: Path) -> Path:
    exe = Path(venv).absolute() / "bin" / "label-studio"
    if not exe.exists():
        raise LabelStudioError(f"{exe} not found: build the Label Studio venv with `make ls-venv`")
    return exe


def server_env(data_dir: Path, local_files_root: Path | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "fflag", "ff_", "feat_")) and k not in _SCRUB
    }
    data_dir = Path(data_dir).absolute()
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_DATABASE_NAME": str(data_dir / DB_NAME),
            "LABEL_STUDIO_DJANGO_DB": "sqlite",
            "LABEL_STUDIO_HOST": "",
            "LABEL_STUDIO_DEBUG": "false",
            "LABEL_STUDIO_CI": "false",
            "LABEL_STUDIO_USERNAME": USERNAME,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
            "fflag_feat_utc_210_prediction_validation_15082025": "true",
        }
    )
    if local_files_root is not None:
        env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
        env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(Path(local_files_root).absolute())
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def ensure_template(venv: Path, template: Path, timeout: float = 900.0) -> Path:
    """A migrated data directory with our user and token, made once (file-locked) and reused."""
    template = Path(template).absolute()
    template.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{template}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (template / CREDENTIALS).exists():
            return template
        work = template.with_name(template.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log = work / "ls-init.log"
        with open(log, "wb") as fh:
            try:
                code = subprocess.run(
                    [str(executable(venv)), "init", "--no-browser"],
                    env=server_env(work),
                    cwd=work,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    start_new_session=True,
                ).returncode
            except subprocess.TimeoutExpired:
                raise LabelStudioError(f"label-studio init timed out; log:\n{_tail(log)}") from None
        if code != 0 or not (work / DB_NAME).exists():
            raise LabelStudioError(f"label-studio init failed ({code}); log:\n{_tail(log)}")
        (work / CREDENTIALS).write_text(json.dumps({"username": USERNAME, "token": TOKEN}))
        shutil.rmtree(template, ignore_errors=True)
        work.rename(template)  # the data directory is not stored in the database: moving it is fine
    return template


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


@contextlib.contextmanager
def label_studio(
    venv: Path, template: Path, data_dir: Path, local_files_root: Path | None = None, timeout: float = 300.0
) -> Iterator[str]:
    """Run a server from a copy of the template; yield its base URL (token: `TOKEN`)."""
    exe = executable(venv)
    shutil.copytree(ensure_template(venv, template), data_dir, ignore=shutil.ignore_patterns("*.log"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = data_dir / LOG_NAME
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "WARNING"],
            env=server_env(data_dir, local_files_root),
            cwd=data_dir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabelStudioError(f"Label Studio exited ({proc.returncode}); log:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"Label Studio not ready on {url} after {timeout:.0f} s:\n{_tail(log)}"
                )
            with contextlib.suppress(OSError):
                if api(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            time.sleep(0.25)
        status, who = api(url, "GET", "/api/current-user/whoami")
        if status != 200 or who.get("email") != USERNAME:
            raise LabelStudioError(f"{url} is not our server or refused the token (HTTP {status}: {who})")
        yield url
    finally:
        _stop(proc)


def api(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """One JSON REST call with our token: (HTTP status, parsed JSON or text); HTTP errors are returned."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", f"Token {TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def project_tasks(url: str, project: int) -> list[dict[str, Any]]:
    """Every task of a project with its predictions (the data manager endpoint, page by page)."""
    tasks: list[dict[str, Any]] = []
    page = 1
    while True:
        status, body = api(url, "GET", f"/api/tasks?project={project}&fields=all&page={page}&page_size=100")
        if status == 404 and tasks:  # past the last page
            return tasks
        if status != 200:
            raise LabelStudioError(f"GET /api/tasks: HTTP {status}: {str(body)[:300]}")
        tasks += body["tasks"]
        if len(tasks) >= body["total"] or not body["tasks"]:
            return tasks
        page += 1


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "init":
        sys.exit("usage: ls_server.py init VENV TEMPLATE_DIR")
    started = time.monotonic()
    ensure_template(Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"Label Studio template ready in {sys.argv[3]} ({time.monotonic() - started:.0f} s)")
