"""Connecting to Ray: an existing cluster (`--ray-address`, else `RAY_ADDRESS`) or a local instance
started for the run, with one-line errors for a missing extra and an unreachable cluster.

`ray.init(address=...)` retries for many minutes against a dead address; the port is probed first so
that a wrong address fails in seconds. A local instance is kept quiet (no dashboard, no usage
statistics, no logs streamed to the terminal) and is stopped when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

from uwe_cli.errors import ResourceError, UweError

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
}
CONNECT_TIMEOUT = 5.0


class ClusterError(UweError):
    """A Ray cluster that cannot be reached or used (missing extra, dead address, too few resources)."""


def import_ray() -> Any:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'uwe-cli[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except ValueError:
        raise ClusterError(f"--ray-address '{address}' is not HOST:PORT") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to `address` (or `RAY_ADDRESS`), to the instance this process already runs, or to
    a local instance started here (and shut down on exit)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    else:
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="warning",
            _temp_dir=temp,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(ray: Any, workers: int, cpus: float, gpus: float = 0.0) -> None:
    """Refuse, before any actor starts, a request the cluster cannot place (Ray would wait forever)."""
    total = ray.cluster_resources()
    if workers * gpus > total.get("GPU", 0.0):
        raise ResourceError(
            f"--workers {workers} × --gpus-per-worker {gpus:g} needs {workers * gpus:g} GPUs; "
            f"the cluster has {total.get('GPU', 0.0):g}"
        )
    if workers * cpus > total.get("CPU", 0.0):
        raise ResourceError(
            f"--workers {workers} needs {workers * cpus:g} CPUs; the cluster has {total.get('CPU', 0.0):g}"
        )
