"""The protocol-agnostic data plane: models in, V2 answers out. HTTP endpoints are thin over it."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kiln import __version__, repository
from kiln.errors import KilnError
from kiln.server.batcher import Closed, Expired, QueueFull
from kiln.server.codec import DATATYPES, BadRequest, Decoded, decode_request, encode_response, split_body
from kiln.server.config import load_config
from kiln.server.metrics import Metrics
from kiln.server.model import ServedModel

log = logging.getLogger("kiln.server")
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository", "model_configuration", "schedule_policy"]


class NotFound(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class Unavailable(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


class DataPlane:
    """
    >>> plane = DataPlane(Path("models")); await plane.load_all()
    >>> body, header_len = await plane.infer("digits", None, request_bytes, None)
    """

    def __init__(self, repo: Path, *, overrides: dict[str, Any] | None = None, only: list[str] | None = None,
                 metrics: Metrics | None = None, drain_s: float = 30.0, model_factory: Any = None,
                 defaults: dict[str, Any] | None = None) -> None:
        if not repo.is_dir():
            raise KilnError(f"model repository not found: {repo}", hint="build a model first: kiln build ... --repo DIR")
        self.repo = repo
        self.overrides = overrides or {}
        self.defaults = defaults or {}  # settings below config.toml (and the command line above it)
        self.only = only
        self.metrics = metrics or Metrics()
        self.drain_s = drain_s
        self.models: dict[str, ServedModel] = {}
        self.errors: dict[str, str] = {}
        self.loading: set[str] = set()
        self.draining = False
        self.fatal: str | None = None  # set when no model could be loaded at start: `kiln serve` exits 1 with it
        # Builds the object that runs a model: ServedModel here; kiln.ray.serve puts remote replicas behind it.
        self.model_factory = model_factory or ServedModel

    # -- repository -------------------------------------------------------------------------------
    def available(self) -> list[str]:
        names = sorted(p.name for p in self.repo.iterdir() if p.is_dir() and repository.versions(p))
        return [n for n in names if self.only is None or n in self.only]

    async def load_all(self) -> None:
        for name in self.available():
            try:
                m = await self.load(name)
                print(f"kiln serve: {name} version {m.version} ({m.variant}, {m.describe()}) ready", file=sys.stderr, flush=True)
            except KilnError as e:  # recorded in self.errors; the index and readiness report it
                print(f"kiln serve: {name} failed to load: {e.message}", file=sys.stderr, flush=True)
        if not self.models and self.errors:
            self.fatal = "no model could be loaded: " + "; ".join(f"{n}: {e}" for n, e in self.errors.items())
        # Everything alive now (torch, the models, their runtimes) lives as long as the server: move it out of the
        # collector's reach, so that a full collection during serving walks only what requests allocate (full
        # collections over this heap were the 120-240 ms stalls seen under load).
        gc.collect()
        gc.freeze()

    async def load(self, name: str) -> ServedModel:
        model_dir = self.repo / _url_name(name)
        if not repository.versions(model_dir):
            raise NotFound(f"no model {name!r} in {self.repo}; the repository has {self.available()}")
        self.loading.add(name)
        try:
            config = load_config(model_dir, self.overrides, self.defaults)
            path = model_dir / str(config.version) if config.version is not None else model_dir
            version_dir, manifest = repository.resolve(path)
            served = self.model_factory(name, version_dir, manifest, config, observer=self.metrics.observe_batch)
            await asyncio.to_thread(served.load)  # load and warm up without blocking the event loop
            if config.shadow_rate > 0:
                await self._watch(served, version_dir, manifest, config.shadow_rate)
        except KilnError as e:
            self.errors[name] = e.message
            raise
        finally:
            self.loading.discard(name)
        old = self.models.get(name)
        served.start()
        self.metrics.track(served)
        self.models[name] = served
        self.errors.pop(name, None)
        if old is not None:
            await old.stop(drain_s=self.drain_s)
        return served

    async def _watch(self, served: ServedModel, version_dir: Path, manifest: dict[str, Any], rate: float) -> None:
        """Drift watch beside a served model (in this process: Ray replicas run their own models)."""
        from kiln.server.fidelity import DriftWatch

        if not isinstance(served, ServedModel):
            log.warning("drift watch (--shadow-rate) is not available for %s on Ray; it runs with kiln serve", served.name)
            return
        watch = DriftWatch(served.name, version_dir, manifest, served.variant, rate, metrics=self.metrics)
        await asyncio.to_thread(watch.load)
        if watch.active:
            served.watch = watch
            print(f"kiln serve: drift watch on {served.name}: {rate:.2%} of requests also run through "
                  f"{watch.reference}", file=sys.stderr, flush=True)

    def fidelity(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.get(name, version)
        watch = getattr(m, "watch", None)  # Ray's remote models have none
        if watch is None:
            raise BadRequest(f"drift watch is off for {name!r}: start kiln serve with --shadow-rate 0.01 (or set "
                             f"shadow_rate in {self.repo / name / 'config.toml'})", status=404)
        report: dict[str, Any] = watch.report()
        return report

    async def unload(self, name: str) -> None:
        served = self.models.pop(_url_name(name), None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        await served.stop(drain_s=self.drain_s)

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop(drain_s=self.drain_s) for m in self.models.values()))

    def begin_drain(self, deadline: float) -> None:
        """SIGTERM: from now on new requests get 503 with Retry-After and readiness says 503; queued requests run
        while they can start before `deadline` (time.monotonic()), the rest are answered 503; running batches finish."""
        self.draining = True
        for m in self.models.values():
            if m.batcher is not None:
                m.batcher.drain(deadline)

    async def drained(self) -> None:
        """Wait until every model's queue is empty and no batch is running."""
        await asyncio.gather(*(m.batcher.idle() for m in self.models.values() if m.batcher is not None))

    def index(self) -> list[dict[str, Any]]:
        out = []
        for name in self.available():
            m = self.models.get(name)
            if m is not None:
                out.append({"name": name, "version": m.version, "state": "READY"})
            elif name in self.loading:
                out.append({"name": name, "state": "LOADING"})
            else:
                out.append({"name": name, "state": "UNAVAILABLE", "reason": self.errors.get(name, "unloaded")})
        return out

    # -- health and metadata ----------------------------------------------------------------------
    def ready(self) -> bool:
        """Every configured model loaded and warm (a model that failed to load makes the server not ready)."""
        return not self.draining and not self.loading and all(n in self.models for n in self.available())

    def not_ready_reasons(self) -> dict[str, str]:
        if self.draining:
            return {"server": "shutting down"}
        out = {n: "loading" for n in self.loading}
        out.update({n: f"failed to load: {e}" for n, e in self.errors.items()})
        out.update({n: "not loaded" for n in self.available() if n not in self.models and n not in out})
        return out

    def get(self, name: str, version: str | None = None) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            if name in self.loading:
                raise Unavailable(f"model {name!r} is still loading; retry when /v2/models/{name}/ready says 200")
            raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self.models)}")
        if version is not None and version != m.version:
            raise NotFound(f"model {name!r} version {version} is not loaded (serving version {m.version}); "
                           f"pin it with version = {version} in {self.repo / name / 'config.toml'}")
        return m

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "kiln", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.get(name, version)

        def tensors(specs: list[Any]) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": DATATYPES[s.dtype], "shape": [d if isinstance(d, int) else -1 for d in s.shape]}
                    for s in specs]

        return {"name": name, "versions": [str(v) for v in repository.versions(self.repo / name)],
                "platform": f"kiln_{m.variant.split('/')[0]}", "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """The model configuration as Triton reports it (what tritonclient and perf_analyzer read)."""
        m = self.get(name, version)
        batched = m.batched

        def tensors(specs: list[Any]) -> list[dict[str, Any]]:
            return [{"name": s.name, "data_type": f"TYPE_{DATATYPES[s.dtype]}",
                     "dims": [d if isinstance(d, int) else -1 for d in (s.shape[1:] if batched else s.shape)]} for s in specs]

        c = m.config
        kind = "KIND_GPU" if any(d.startswith("cuda") for d in c.devices) else "KIND_CPU"
        return {
            "name": name, "platform": f"kiln_{m.variant.split('/')[0]}", "backend": "kiln",
            "max_batch_size": c.max_batch_size if batched else 0,
            "input": tensors(m.inputs), "output": tensors(m.outputs),
            "dynamic_batching": {"preferred_batch_size": c.preferred_batch_sizes, "adaptive": c.adaptive_batching,
                                 "max_queue_delay_microseconds": int(c.max_delay_ms * 1000),
                                 "default_queue_policy": {"max_queue_size": c.max_queue_size,
                                                          "default_timeout_microseconds": int(c.timeout_ms * 1000)}},
            "instance_group": [{"count": c.instances, "kind": kind, **({"gpus": [int(d.split(":")[1]) if ":" in d else 0 for d in c.devices]} if kind == "KIND_GPU" else {})}],
            "version_policy": {"specific": {"versions": [int(m.version)]}},
            "parameters": {"variant": {"string_value": m.variant}},
        }

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        models = [self.get(name, version)] if name else list(self.models.values())

        def d(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        out = []
        for m in models:
            s = m.stats
            out.append({
                "name": m.name, "version": m.version, "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count, "execution_count": s.execution_count,
                # Triton's shape: one compute_input/infer/output per execution, so the three counts are equal (what
                # perf_analyzer checks).
                "inference_stats": {"success": d(s.success_count, s.success_ns), "fail": d(s.fail_count, s.fail_ns),
                                    "queue": d(s.queue_count, s.queue_ns),
                                    "compute_input": d(s.compute_count, s.compute_input_ns),
                                    "compute_infer": d(s.compute_count, s.compute_infer_ns),
                                    "compute_output": d(s.compute_count, s.compute_output_ns),
                                    "cache_hit": d(0, 0), "cache_miss": d(0, 0)},
                "batch_stats": [{"batch_size": b, "compute_input": d(v[0], 0), "compute_infer": d(v[0], v[1]),
                                 "compute_output": d(v[0], 0)} for b, v in sorted(s.batch_sizes.items())],
            })
        return {"model_stats": out}

    # -- inference --------------------------------------------------------------------------------
    async def infer(self, name: str, version: str | None, body: bytes, header_length: str | None,
                    timeout_ms: str | None = None) -> tuple[bytes, int | None]:
        """One V2 request body (JSON, or JSON + binary tensors) -> the response body and its header length."""
        m = self.get(name, version)
        self.admit(m)

        async def work() -> tuple[bytes, int | None]:
            doc, tail = split_body(body, header_length)
            req, outs = await self._run(m, doc, tail, timeout_ms)
            names = {s.name: i for i, s in enumerate(m.outputs)}
            return encode_response(name, m.version, req.id, req.outputs, [outs[names[n]] for n in req.outputs],
                                   m.outputs, req.binary)

        return await self._observed(m, work)

    async def infer_doc(self, name: str, version: str | None, doc: dict[str, Any], tail: memoryview,
                        timeout_ms: str | None = None) -> tuple[ServedModel, Decoded, list[np.ndarray]]:
        """An already parsed V2 request (gRPC): the same admission, validation, batcher and metrics as HTTP."""
        m = self.get(name, version)
        self.admit(m)
        req, outs = await self._observed(m, lambda: self._run(m, doc, tail, timeout_ms))
        return m, req, outs

    def admit(self, m: ServedModel) -> None:
        """Refuse before decoding anything when the request cannot be queued: a full queue costs no JSON parsing."""
        b = m.batcher
        if self.draining:
            reason, err = "shutting_down", BadRequest("the server is shutting down; retry against another replica", 503)
        elif b is not None and b.queue_depth >= b.max_queue_size:
            reason, err = "queue_full", BadRequest(f"queue full ({b.max_queue_size} requests waiting); retry after a "
                                                   "short wait", 429)
        else:
            return
        self.metrics.request_failure.labels(m.name, m.version, reason).inc()
        self.metrics.rejections.labels(m.name, m.version, reason).inc()
        m.stats.fail_count += 1
        raise err

    async def _run(self, m: ServedModel, doc: dict[str, Any], tail: memoryview,
                   timeout_ms: str | None) -> tuple[Decoded, list[np.ndarray]]:
        """Validate a decoded V2 request against the model's specs, then run it through the batcher."""
        req = decode_request(doc, tail, m.inputs, m.outputs, batched=m.batched, allow_nonfinite=m.config.allow_nonfinite)
        if m.batched and req.rows > m.config.max_batch_size:
            raise BadRequest(f"the request has {req.rows} rows, more than max_batch_size {m.config.max_batch_size}; "
                             "split it, or raise max_batch_size in config.toml")
        return req, await m.infer(req, timeout_s=_timeout(timeout_ms, req.parameters, m.config.timeout_ms))

    async def _observed(self, m: ServedModel, work: Any) -> Any:
        """Run one request's work with its statistics and metrics; map failures to HTTP errors."""
        t0 = time.perf_counter()
        labels = (m.name, m.version)
        try:
            result = await work()
        except BaseException as e:
            elapsed = time.perf_counter() - t0
            m.stats.fail_count += 1
            m.stats.fail_ns += int(elapsed * 1e9)
            reason, err = _classify(e)
            self.metrics.request_failure.labels(*labels, reason).inc()
            if reason in ("queue_full", "timeout", "shutting_down"):
                self.metrics.rejections.labels(*labels, reason).inc()
            self.metrics.request_latency.labels(*labels).observe(elapsed)
            if err is None:
                raise
            raise err from None
        elapsed = time.perf_counter() - t0
        m.stats.success_count += 1
        m.stats.success_ns += int(elapsed * 1e9)
        self.metrics.request_success.labels(*labels).inc()
        self.metrics.request_latency.labels(*labels).observe(elapsed)
        return result

    async def predict_v1(self, name: str, instances: Any) -> dict[str, Any]:
        """`{"instances": [...]}` -> `{"predictions": [...]}`: one instance per row; dicts for several inputs."""
        m = self.get(name)
        if not isinstance(instances, list) or not instances:
            raise BadRequest('send {"instances": [row, ...]} with at least one row')
        if len(m.inputs) == 1 and not isinstance(instances[0], dict):
            columns = {m.inputs[0].name: instances}
        else:
            if not all(isinstance(i, dict) for i in instances):
                raise BadRequest(f"this model takes {[s.name for s in m.inputs]}: send each instance as an object keyed by input name")
            columns = {s.name: [i.get(s.name) for i in instances] for s in m.inputs}
        inputs = []
        for s in m.inputs:
            try:
                a = np.asarray(columns[s.name], dtype=np.dtype(s.dtype) if s.dtype != "bfloat16" else np.float32)
            except (ValueError, TypeError):
                raise BadRequest(f'instances for input "{s.name}" must be numbers of shape {list(s.shape[1:])}') from None
            inputs.append({"name": s.name, "datatype": DATATYPES[s.dtype], "shape": list(a.shape), "data": a})
        # Straight to admission, validation and the batcher (as gRPC goes): no JSON round trip in between.
        _, _, outs = await self.infer_doc(name, None, {"inputs": inputs}, memoryview(b""))
        if len(outs) == 1:
            return {"predictions": outs[0].tolist()}
        return {"predictions": [{s.name: o[i].tolist() for s, o in zip(m.outputs, outs)} for i in range(len(instances))]}


def _timeout(header: str | None, params: dict[str, Any], limit_ms: float) -> float | None:
    """The client's deadline (kiln-timeout-ms header or timeout_ms parameter): it may ask for less than the model's
    timeout_ms, never for more."""
    value = header if header is not None else params.get("timeout_ms")
    if value is None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"timeout must be a number of milliseconds, got {value!r}") from None
    if not 0 < t < float("inf"):
        raise BadRequest(f"timeout must be a positive number of milliseconds, got {value!r}")
    return min(t, limit_ms) / 1e3


def _url_name(name: str) -> str:
    """A model name from a URL passes the same check as the CLI's (no '..', no '/', no over-long names)."""
    try:
        return repository.check_name(name)
    except KilnError as e:
        raise BadRequest(f"{e.message}; {e.hint}") from None


def _classify(e: BaseException) -> tuple[str, BadRequest | None]:
    if isinstance(e, BadRequest):
        return ("bad_request" if e.status < 500 else "unavailable"), e
    if isinstance(e, QueueFull):
        return "queue_full", BadRequest(f"{e}; retry after a short wait", status=429)
    if isinstance(e, Expired):
        return "timeout", BadRequest(f"request timed out: {e}", status=504)
    if isinstance(e, Closed):
        return "shutting_down", BadRequest(str(e), status=503)
    if isinstance(e, KilnError):
        return "bad_request", BadRequest(e.message + (f"; {e.hint}" if e.hint else ""))
    if isinstance(e, asyncio.CancelledError):
        return "cancelled", None
    return "model_error", internal_error(e)


def internal_error(e: BaseException) -> BadRequest:
    """A genuine server fault: 500 with a request id; the exception itself goes to the log, not to the client."""
    rid = uuid.uuid4().hex[:12]
    log.error("request %s failed: %s: %s", rid, type(e).__name__, e, exc_info=e)
    err = BadRequest(f"internal error while running the model (request id {rid}); the server log has the details",
                     status=500)
    err.request_id = rid
    return err
