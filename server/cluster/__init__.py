"""Scale-out on Ray Serve: the app as the ingress, the engine as a replicated deployment.

    HTTP -> Ray Serve proxy -> Ingress (create_app(...) with a RemoteEngine, remote.py)
                                  |  reserve / generate, routed by adapter set (routing.py)
                                  v
                               EngineReplica x N (replica.py): Engine + registry + metrics
                                  |
                               one adapter store directory, shared by all (the registry's
                               `shared` mode re-validates each lookup against it)

`adapter-server serve --replicas N` starts a local Ray instance and runs this application;
`--ray-address auto` joins a running cluster instead. `serve run docker/ray-serve.yaml` runs
it from a config file (`app_builder`). Ray Serve supervises the replicas (health checks,
restarts, autoscaling); nothing here does.
"""

from __future__ import annotations

import logging
import signal
import threading
from ..app import create_app, engine_state
from ..metrics import Metrics
from ..settings import Settings
from .metrics import ReplicaMetrics

log = logging.getLogger(__name__)

APP_NAME = "adapter-server"
INGRESS_MAX_ONGOING = 1024  # concurrent HTTP requests one ingress replica takes (they mostly wait)
ROUTINGS = ("affinity", "random")  # how the ingress keys requests (routing.py); one router for both


def engine_deployment(settings: Settings, gpus: float):
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from .replica import EngineReplica

    options = {}
    if settings.max_replicas and settings.max_replicas > (settings.replicas or 1):
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.replicas or 1, max_replicas=settings.max_replicas,
            target_ongoing_requests=max(settings.max_batch // 2, 1))
    else:
        options["num_replicas"] = settings.replicas or 1
    return serve.deployment(
        EngineReplica, name="EngineReplica",
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": gpus},
        max_ongoing_requests=settings.max_batch + 4,  # its batch, plus room for control calls
        max_queued_requests=settings.max_queue,  # per caller; past it: 429
        health_check_period_s=5.0, graceful_shutdown_timeout_s=settings.shutdown_grace_s + 5,
        request_router_config=RequestRouterConfig(
            request_router_class="server.cluster.routing.AdapterAffinityRouter",
            request_router_kwargs={"capacity": settings.device_cache_adapters, "batch": settings.max_batch},
            request_routing_stats_period_s=2.0, request_routing_stats_timeout_s=10.0),
        **options)


class Ingress:
    """The ingress deployment: the app of server/app.py, its engine a `RemoteEngine`."""

    async def __init__(self, engine, settings: Settings):
        from .remote import RemoteEngine  # Ray's (routing.py): imported where Ray runs

        self.settings = settings
        self.metrics = Metrics(lambda: engine_state(self.engine))
        self.engine = await RemoteEngine.connect(engine, settings, self.metrics.engine_hooks())

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings, engine=self.engine, metrics=self.metrics)
        self.metrics.registry.register(ReplicaMetrics(self.engine))
        return app


def build(settings: Settings, gpus: float = 0.0):
    """The Ray Serve application (not yet running)."""
    from ray import serve

    if settings.routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {settings.routing!r}")
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=INGRESS_MAX_ONGOING)
    return ingress.bind(engine_deployment(settings, gpus).bind(settings), settings)


def app_builder(args: dict):
    """For `serve run` config files (docker/ray-serve.yaml): `args` are Settings fields (the
    ADAPTER_SERVER_* variables apply underneath)."""
    import ray

    settings = Settings.from_env(**args)
    return build(settings, replica_gpus(settings, ray.cluster_resources() if ray.is_initialized() else {}))


def replica_gpus(settings: Settings, resources: dict) -> float:
    """GPUs per replica: as set, else one where the cluster has GPUs and the device allows it."""
    if settings.replica_gpus is not None:
        return settings.replica_gpus
    if settings.device == "cpu":
        return 0.0
    return 1.0 if resources.get("GPU", 0) >= 1 else 0.0


def start_ray(settings: Settings) -> None:
    """Join `settings.ray_address`, or start a small local instance: no dashboard, a small
    object store, the replicas' CPUs only, logs in Ray's session folder."""
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports home
    if not settings.ray_address:
        # a single-node instance: Ray's processes talk over the loopback address (Ray's switch
        # for this is the one it uses on macOS and Windows, where clusters are off by default)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    quiet = dict(log_to_driver=False, configure_logging=False)
    if settings.ray_address:
        ray.init(address=settings.ray_address, **quiet)
        return
    replicas = max(settings.replicas or 1, settings.max_replicas or 0)
    ray.init(num_cpus=max(replicas * settings.replica_cpus, 1), include_dashboard=False,
             object_store_memory=128 << 20, **quiet)


def run(settings: Settings) -> int:
    """`adapter-server serve --replicas N`: run the application until SIGTERM/SIGINT."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    start_ray(settings)
    log.info("ray cluster at %s", ray.get_runtime_context().gcs_address)
    serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port))
    serve.run(build(settings, replica_gpus(settings, ray.cluster_resources())), name=APP_NAME, route_prefix="/",
              blocking=False)
    log.info("serving on http://%s:%d with %s engine replicas", settings.host, settings.port,
             settings.replicas if not settings.max_replicas else f"{settings.replicas or 1}-{settings.max_replicas}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    if settings.ray_address:
        serve.delete(APP_NAME)  # a shared cluster keeps running
    else:
        serve.shutdown()
        ray.shutdown()
    return 0
