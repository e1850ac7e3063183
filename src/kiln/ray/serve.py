"""Ray Serve: one deployment per model (batcher and runners, its own replicas and autoscaling) behind
an ingress deployment that speaks the KServe v2 HTTP API with kiln's own app, so that validation,
errors and batching are the same as `kiln serve`.

    serve.run(kiln.ray.deployment("models"), name="kiln", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from pathlib import Path
from typing import Any

from ray import serve

from kiln import repository
from kiln.errors import KilnError
from kiln.server.codec import Decoded
from kiln.server.config import ModelConfig, load_config
from kiln.server.metrics import Metrics
from kiln.server.model import ServedModel


@serve.deployment
class KilnModel:
    """One model's replica: a ServedModel (runners + Batcher) like `kiln serve` runs."""

    def __init__(self, version_dir: str, config: dict[str, Any]) -> None:
        vdir, manifest = repository.resolve(version_dir)
        self.model = ServedModel(manifest["name"], vdir, manifest, ModelConfig(**config))
        self.model.load()
        self.replica = uuid.uuid4().hex[:12]

    def _start(self) -> None:
        if self.model.batcher is None:
            self.model.start()  # needs the replica's running event loop

    async def ready(self) -> bool:
        self._start()
        return True

    async def infer(self, arrays: list[Any], rows: int, timeout_s: float | None) -> tuple[list[Any], dict[str, Any]]:
        """The outputs, and this replica's statistics so far (the ingress aggregates the replicas' reports)."""
        self._start()
        req = Decoded(None, arrays, rows, [], set(), {})
        outs = await self.model.infer(req, timeout_s=timeout_s)
        return outs, self.report()

    def report(self) -> dict[str, Any]:
        return {"replica": self.replica, "stats": dataclasses.asdict(self.model.stats),
                "queue_depth": self.model.queue_depth(), "in_flight": self.model.in_flight()}


class RemoteModel(ServedModel):
    """The ingress's view of a model: validated requests go to the model deployment's replicas. `handles` maps
    model names to their deployments' handles; each ingress passes its own (no state shared through the class)."""

    def __init__(self, name: str, version_dir: Path, manifest: dict[str, Any], config: ModelConfig, *,
                 handles: dict[str, Any], metrics: Metrics, observer: Any = None) -> None:
        super().__init__(name, version_dir, manifest, config, observer=observer)
        self.handles = handles
        self.metrics = metrics
        self.replicas: dict[str, dict[str, Any]] = {}  # the latest report of each replica

    def describe(self) -> str:
        return "Ray Serve deployment"

    def load(self) -> None:
        self.handle = self.handles[self.name]
        self.handle.ready.remote().result()

    def start(self) -> None:
        self.ready = True

    async def stop(self, *, drain_s: float = 30.0) -> None:
        self.ready = False

    async def infer(self, req: Decoded, *, timeout_s: float | None) -> list[Any]:
        timeout = timeout_s or self.config.timeout_ms / 1e3
        try:
            outs, report = await asyncio.wait_for(self.handle.infer.remote(req.arrays, req.rows, timeout), timeout + 5)
        except TimeoutError:
            from kiln.server.batcher import Expired

            raise Expired(f"no answer from the model's replicas within {timeout * 1e3:.0f} ms") from None
        self._merge(report)
        return list(outs)

    def _merge(self, report: dict[str, Any]) -> None:
        """Execution-side statistics are the sum of the replicas' latest reports; request-side ones (success,
        failure) are the ingress's own. Prometheus counters move by what the sum grew."""
        before = (self.stats.inference_count, self.stats.execution_count)
        self.replicas[report["replica"]] = report
        reports = [r["stats"] for r in self.replicas.values()]
        s = self.stats
        for name in ("queue_count", "queue_ns", "compute_count", "compute_ns", "compute_input_ns", "compute_infer_ns",
                     "compute_output_ns", "inference_count", "execution_count"):
            setattr(s, name, sum(int(r.get(name, 0)) for r in reports))
        s.last_inference_ms = max(int(r.get("last_inference_ms", 0)) for r in reports)
        sizes: dict[int, list[int]] = {}
        for r in reports:
            for b, (count, ns) in r.get("batch_sizes", {}).items():
                acc = sizes.setdefault(int(b), [0, 0])
                acc[0] += count
                acc[1] += ns
        s.batch_sizes = sizes
        labels = (self.name, self.version)
        self.metrics.inference_count.labels(*labels).inc(max(0, s.inference_count - before[0]))
        self.metrics.execution_count.labels(*labels).inc(max(0, s.execution_count - before[1]))

    def queue_depth(self) -> int:
        return sum(int(r["queue_depth"]) for r in self.replicas.values())

    def in_flight(self) -> int:
        return sum(int(r["in_flight"]) for r in self.replicas.values())


@serve.ingress()
class KilnIngress:
    """The HTTP front: kiln's KServe v2 app over a DataPlane whose models are remote."""

    def __init__(self, repo: str, models: list[str], overrides: dict[str, Any], api_key: str | None,
                 max_body_bytes: int, handles: dict[str, Any]) -> None:
        self.repo, self.models, self.overrides = repo, models, overrides
        self.api_key, self.max_body_bytes, self.handles = api_key, max_body_bytes, handles

    def __serve_build_asgi_app__(self) -> Any:
        from kiln.server.app import create_app
        from kiln.server.dataplane import DataPlane

        metrics = Metrics()
        factory = functools.partial(RemoteModel, handles=self.handles, metrics=metrics)
        plane = DataPlane(Path(self.repo), overrides=self.overrides, only=self.models, model_factory=factory,
                          metrics=metrics)
        return create_app(plane, api_key=self.api_key, max_body_bytes=self.max_body_bytes, load_in_background=False)


def deployment(repo: str | Path, *, models: list[str] | None = None, overrides: dict[str, Any] | None = None,
               num_replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
               target_ongoing_requests: float = 2.0, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
               api_key: str | None = None, max_body_bytes: int = 64 << 20) -> Any:
    """A Ray Serve application: run it with serve.run(app, name=..., route_prefix="/").

    `max_replicas` turns on autoscaling between `min_replicas` (default 1) and it, aiming at
    `target_ongoing_requests` per replica; otherwise each model runs `num_replicas` replicas.
    """
    from kiln.server.dataplane import DataPlane

    repo = Path(repo).resolve()
    names = DataPlane(repo, only=models).available()
    if models:
        missing = sorted(set(models) - set(names))
        if missing:
            raise KilnError(f"no model {', '.join(missing)} in {repo}", hint=f"the repository has {DataPlane(repo).available()}")
    if not names:
        raise KilnError(f"no built models in {repo}", hint="build one with kiln build ... --repo " + str(repo))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bound = {}
    for name in names:
        config = load_config(repo / name, overrides)
        path = repo / name / str(config.version) if config.version is not None else repo / name
        version_dir, _ = repository.resolve(path)
        opts: dict[str, Any] = {"name": f"kiln-{name}", "max_ongoing_requests": max(8, config.max_queue_size),
                                "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
        if max_replicas is not None:
            opts["autoscaling_config"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas,
                                          "target_ongoing_requests": target_ongoing_requests}
        else:
            opts["num_replicas"] = num_replicas
        model = KilnModel.options(**opts)  # type: ignore[attr-defined]
        bound[name] = model.bind(str(version_dir), config.model_dump())
    ingress = serve.deployment(KilnIngress).options(  # type: ignore[attr-defined]
        name="kiln-ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    return ingress.bind(str(repo), names, overrides, api_key, max_body_bytes, bound)


def run(repo: str | Path, *, host: str, port: int, address: str | None, models: list[str] | None,
        overrides: dict[str, Any], **options: Any) -> None:
    """`kiln serve --ray`: deploy on a local Ray (or the cluster at `address`) and serve until a signal."""
    import signal
    import sys
    import threading

    import ray

    from kiln.ray.cluster import init

    app = deployment(repo, models=models, overrides=overrides, **options)
    init(address)
    stop = threading.Event()
    # Right after ray.init (which sets its own SIGTERM handler) and before deploying: the HTTP port
    # answers before serve.run returns, so a signal can come early. It then stops the server as soon
    # as it is up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="kiln", route_prefix="/")
        print(f"kiln serve --ray: {', '.join(models or []) or 'all models'} on http://{host}:{port} "
              f"(Ray Serve; ready at /v2/health/ready)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()  # replicas finish in-flight requests first (graceful_shutdown_timeout_s)
        ray.shutdown()
