"""The local Ray cluster of ``dd-run batch`` and ``dd-run serve``: listening on 127.0.0.1 only."""

from __future__ import annotations

import importlib
import os
from typing import Any

from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError


def import_ray(extra: str = "ray") -> Any:
    """Ray, or a one-line error naming the extra to install."""
    # Read by Ray when it is first imported: its node IP is then the loopback address. A process
    # that imported Ray earlier is handled in start_local_cluster.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return require("ray", extra)


def start_local_cluster(ray: Any, *, num_cpus: int, num_gpus: int = 0, **kw: Any) -> None:
    """Start a one-node Ray cluster that listens on 127.0.0.1 only, or fail with one line.

    ``_node_ip_address`` alone is not enough: the raylet registers under the address Ray's
    ``services.get_node_ip_address`` picks, which is the machine's routable one unless Ray's
    ``ENABLE_RAY_CLUSTER`` constant is off. That constant is read from the environment when Ray
    is first imported, so a process that imported Ray before us (a test session, a notebook)
    gets it switched off here. The nodes' addresses are checked after the start.
    """
    constants = importlib.import_module("ray._private.ray_constants")
    constants.ENABLE_RAY_CLUSTER = False
    # Ray starts workers at nice 15 by default; a local job should not lose the CPU to every
    # other process on the machine (dd-run upscale runs at nice 0 too).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address="127.0.0.1", **kw)
    exposed = sorted(
        {n["NodeManagerAddress"] for n in ray.nodes()} - {"127.0.0.1", "localhost", "::1"}
    )
    if exposed:
        ray.shutdown()
        raise DeltaDiffError(
            f"the local Ray cluster registered on {', '.join(exposed)}, not 127.0.0.1; "
            "start Ray yourself (ray start --node-ip-address 127.0.0.1) and pass --address"
        )
