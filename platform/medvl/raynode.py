"""Starting a Ray node on this machine: `ray.init()` without an address (medvl's embedded Ray, the ingest pools).

Ray 2.60 starts every node's dashboard agent with its HTTP server on the fixed port 52365, and `ray.init` has no
option to change it. When a second Ray runs on the same machine (two commands at once, a sweep next to a job, the
test suite's two processes) or the agent of a killed driver is still exiting, that port is taken: the new agent
retries the bind with a growing back-off for about 3 s, gives up and runs without its HTTP server, and the raylet
waits for it. Measured on this 2-core machine next to another Ray node (`./dev bench ray_start --ref 0b4e93a`):
`ensure_ray` 6.71 s median before, 2.73 s with the port chosen by the operating system (`ray start` has `--dashboard-agent-listen-port` for this; the raylet and
the GCS learn the bound port from the agent, as they do for its other ports).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator


def init_local(**kwargs: Any) -> Any:
    """`ray.init(**kwargs)` for a new node on this machine, its dashboard agent's HTTP port bound by the OS."""
    import ray
    with _agent_port_chosen_by_os():
        return ray.init(**kwargs)


@contextlib.contextmanager
def _agent_port_chosen_by_os() -> Iterator[None]:
    """Inside the block, the node parameters that `ray.init` builds default to dashboard_agent_listen_port=0
    (Ray's node code treats 0 as "the component binds a free port and reports it"). Ray keeps this default in
    `RayParams.__init__`, which `ray.init` looks up on the module when it starts a node; without that parameter
    (another Ray version) nothing changes."""
    import ray._private.parameter as params
    base = params.RayParams
    if "dashboard_agent_listen_port" not in inspect.signature(base.__init__).parameters:
        yield
        return

    class _LocalNodeParams(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    params.RayParams = _LocalNodeParams
    try:
        yield
    finally:
        params.RayParams = base


__all__ = ["init_local"]
