"""Where a Ray sweep runs: a local Ray started for the sweep, or an existing cluster joined by address.

``ray.init`` can wait a long time for a cluster that is not there, so an explicit address is first
checked with a short TCP connect and an unreachable one is a clear error within seconds. Data roots
are paths on the machine that runs a trial: :func:`check_data_root` is called at the start of every
trial so that a node without the data says so by name instead of failing somewhere inside a reader.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from fusionsearch.errors import ConfigError, DataError

CONNECT_TIMEOUT_S = 3.0


def requested_address(address: str | None) -> str | None:
    """The cluster to join: ``--address`` if given, else ``RAY_ADDRESS``, else None (local Ray)."""
    if address:
        return address.strip()
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env or None


def _host_port(address: str) -> tuple[str, int]:
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port_text = text.rstrip("/").rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(
            f"'{address}' is not a Ray address",
            field="--address",
            fix="Give HOST:PORT of the head node (e.g. 10.0.0.5:6379), ray://HOST:PORT, or 'auto' for the cluster "
            "started on this machine with 'ray start'",
        )
    return host.strip("[]"), int(port_text)


def _resolve_auto() -> str:
    """Find the address of the cluster started on this machine (``ray start``), or fail clearly."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError:
        raise ConfigError(
            "no running Ray cluster was found on this machine",
            field="--address auto",
            fix="Start one with 'ray start --head' (and 'ray start --address HEAD:PORT' on the other nodes), "
            "give the head's HOST:PORT, or leave out --address to run on a local Ray started for the sweep",
        ) from None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a ConfigError within ``timeout`` seconds when nothing listens at ``address``."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else (exc.strerror or str(exc))
        raise ConfigError(
            f"cannot reach the Ray cluster at {host}:{port} ({why} after at most {timeout:g} s)",
            field="--address",
            fix=f"Check that the head node runs ('ray start --head --port {port}' there) and that this machine "
            f"can reach that port, or leave out --address to run locally",
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[str]:
    """Connect to (or start) Ray for the duration of a sweep; yields a short description.

    A Ray already initialised in this process (a notebook, a test fixture) is used as is and left
    running. An explicit or ``RAY_ADDRESS`` address joins that cluster; otherwise a local Ray is
    started with this machine's CPUs and no dashboard, and shut down afterwards.
    """
    import ray

    if ray.is_initialized():
        yield "the Ray already running in this process"
        return
    target = requested_address(address)
    if target is not None:
        resolved = _resolve_auto() if target == "auto" else target
        check_reachable(resolved)
        try:
            # 'auto' stays 'auto' for Ray: only then does it pick up this machine's auth token by itself
            ray.init(address=target if target == "auto" else resolved)
        except ConnectionError as exc:
            auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            raise ConfigError(
                f"could not join the Ray cluster at {resolved}: {exc}",
                field="--address",
                fix=(
                    "Check that the head node runs the same Ray and Python versions as this machine"
                    if auth
                    else "If the cluster uses token authentication (the default of 'ray start' in recent Ray), "
                    "set RAY_AUTH_MODE=token and give the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN); "
                    "also check that the head runs the same Ray and Python versions as this machine"
                ),
            ) from None
        description = f"the Ray cluster at {resolved}"
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
        description = "a local Ray"
    try:
        yield description
    finally:
        ray.shutdown()


def check_data_root(root: str | os.PathLike[str] | None, *, field: str = "data.root") -> None:
    """Fail a trial early and clearly when its data root does not exist on the node running it."""
    if root is None:
        return
    path = Path(root).expanduser()
    if path.exists():
        return
    node = socket.gethostname()
    raise DataError(
        f"{field}: the data root '{path}' does not exist on node '{node}', which runs this trial. Every node "
        f"of a Ray cluster must see the data at the same path: mount or copy it there (or pass --data-root with "
        f"a path valid on every node), then continue the sweep with --resume."
    )
