"""`vlm-serve -m EXPORT --ray --replicas N`: the same routes on --host/--port, served by Ray Serve over N model
replicas (a local Ray instance, or the cluster at --ray-address), until Ctrl-C.

Needs the optional 'ray' extra; without it the command says so in one line (`pip install 'vlm-core[ray]'`).
Every host needs the serve-time install only (no torch) and the export folder at the same path.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from vlm_core.errors import UserError
from vlm_core.runtime.cluster.affinity import DEFAULT_MARGIN
from vlm_core.runtime.server.config import ServeConfig

INSTALL_HINT = "pip install 'vlm-core[ray]'"
APP_NAME = "vlm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """vlm-serve's Ray Serve options."""
    group = parser.add_argument_group("scale-out on Ray Serve (the 'ray' extra)")
    group.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve: an ingress with these routes and --replicas model replicas, "
                            "each with its own engine; a follow-up turn or a repeated image goes to the replica "
                            "holding its KV / image features")
    group.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscale between --replicas and this many on requests in flight (target: --parallel "
                            "per replica)")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. 'auto' or 'ray://head:10001'; default: start a local one)")
    group.add_argument("--no-affinity", dest="affinity", action="store_false",
                       help="route by load alone (power of two choices), ignoring conversations and images")
    group.add_argument("--affinity-margin", type=int, default=DEFAULT_MARGIN,
                       help=f"ignore affinity when that replica has more than this many requests in flight above "
                            f"the least loaded one (default {DEFAULT_MARGIN})")


def import_ray():
    """(ray, ray.serve), or a UserError naming the extra."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError(f"--ray needs the 'ray' extra (Ray Serve): {INSTALL_HINT}") from None
    return ray, serve


def builder_args(config: ServeConfig, args) -> dict:
    """The arguments of deployments.build_app for this command line."""
    built = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("host", "port")}
    built["model"] = os.path.abspath(config.model)  # replicas may start in another working folder
    built.update(replicas=args.replicas, affinity=args.affinity, margin=args.affinity_margin)
    if args.max_replicas is not None:
        built.update(min_replicas=args.replicas, max_replicas=args.max_replicas)
    return built


def serve_on_ray(config: ServeConfig, args) -> int:
    """Start (or join) Ray, run the application on --host/--port, block until interrupted."""
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise UserError("--replicas must be at least 1, and --max-replicas at least --replicas")
    ray, serve = import_ray()
    from vlm_core.runtime.cluster.deployments import build_app

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
    ray.init(address=args.ray_address, runtime_env=runtime_env, include_dashboard=False,
             logging_level=config.log_level.upper())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(builder_args(config, args)), name=APP_NAME, route_prefix="/",
              logging_config={"log_level": config.log_level.upper()})
    print(f"serving {config.name!r} on http://{config.host}:{config.port}/ (OpenAI API at /v1) through Ray Serve, "
          f"{args.replicas} replica(s)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
