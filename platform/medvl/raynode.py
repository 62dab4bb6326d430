"""Starting a Ray node on this machine: `ray.init()` without an address (medvl's embedded Ray, the ingest pools).

Ray 2.60 starts every node's dashboard agent with its HTTP server on the fixed port 52365, and `ray.init` has no
option to change it. When a second Ray runs on the same machine (two commands at once, a sweep next to a job, the
test suite's two processes) or the agent of a killed driver is still exiting, that port is taken: the new agent
retries the bind with a growing back-off for about 3 s, gives up and runs without its HTTP server, and the raylet
waits for it. Measured on this 2-core machine next to another Ray node (`./dev bench ray_start --ref 0b4e93a`):
`ensure_ray` 6.71 s median before, 2.73 s with the port chosen by the operating system (`ray start` has `--dashboard-agent-listen-port` for this; the raylet and
the GCS learn the bound port from the agent, as they do for its other ports).

`init_local(node_env)` also hands settings to the node's raylet (`RayParams.env_vars`), which its workers and
agents inherit, without ever putting them into this process's own environment: `medvl train` loads its recipe
in a helper thread while Ray starts (medvl.train.launcher.load_while_ray_starts), and that thread loads libgomp
with torch, which reads GOMP_SPINCOUNT once.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Iterator, Optional


def init_local(node_env: Optional[dict[str, str]] = None, **kwargs: Any) -> Any:
    """`ray.init(**kwargs)` for a new node on this machine, its dashboard agent's HTTP port bound by the OS.
    `node_env`: environment variables for the node's raylet, which its workers and agents inherit (this process's
    own environment is not touched, so other threads of it never see them)."""
    import ray
    with _local_node_params(node_env or {}) as rest:
        if rest:  # a Ray whose node parameters take no `env_vars`: the environment the node's processes inherit
            with _environment(rest):
                return ray.init(**kwargs)
        return ray.init(**kwargs)


@contextlib.contextmanager
def _local_node_params(node_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Inside the block, the node parameters that `ray.init` builds default to dashboard_agent_listen_port=0
    (Ray's node code treats 0 as "the component binds a free port and reports it") and env_vars=`node_env` (the
    raylet's environment overrides; its workers and agents inherit them). Ray keeps these defaults in
    `RayParams.__init__`, which `ray.init` looks up on the module when it starts a node. Yields what could not be
    set that way (another Ray version): all of `node_env` when the parameters have no `env_vars`."""
    import ray._private.parameter as params
    base = params.RayParams
    names = inspect.signature(base.__init__).parameters
    defaults: dict[str, Any] = {}
    if "dashboard_agent_listen_port" in names:
        defaults["dashboard_agent_listen_port"] = 0
    if node_env and "env_vars" in names:
        defaults["env_vars"] = dict(node_env)
    if not defaults:
        yield dict(node_env)
        return

    class _LocalNodeParams(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            for k, v in defaults.items():
                kwargs.setdefault(k, v)
            super().__init__(*args, **kwargs)

    params.RayParams = _LocalNodeParams
    try:
        yield {} if "env_vars" in defaults else dict(node_env)
    finally:
        params.RayParams = base


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` in os.environ inside the block (the processes started in it inherit it), the previous values after."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["init_local"]
