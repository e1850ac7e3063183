"""The workers of one `kiln serve --workers N` answer as one server.

Each worker also listens on a Unix socket in a run directory its supervisor made (`worker-<i>.sock`). The
endpoints whose answer covers the whole server ask the other workers there, with the `kiln-worker-local` header
(answer for yourself only), and merge: readiness (ready when every worker is), statistics and metrics (sums),
drift watch (every worker's report), repository load/unload (done on every worker). Everything else, inference
included, is answered by the worker that holds the connection: the supervisor deals connections to the workers in
turn (kiln.server.workers.Dealer), and a worker never forwards a request.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

LOCAL = "kiln-worker-local"  # request header: answer for this worker only
ANSWERED = "kiln-workers"  # response header of a merged answer: "answered/total"
WORKER = "kiln-worker"  # response header of a local answer (statistics, metrics): which worker gave it
ASK_TIMEOUT_S = 5.0  # readiness, statistics, metrics: a worker that takes longer is reported as not answering
LOAD_TIMEOUT_S = 3600.0  # repository load: a compile variant takes minutes to load and warm up
# Gauges whose server-wide value is the workers' sum; any other gauge is kept per worker, labelled worker="i".
SUMMED_GAUGES = {"kiln_queue_depth", "kiln_in_flight"}


def socket_path(rundir: str | Path, index: int) -> Path:
    return Path(rundir) / f"worker-{index}.sock"


class Peers:
    """This worker's view of the others."""

    def __init__(self, rundir: str | Path, index: int, count: int) -> None:
        self.index = index
        self.count = count
        self.others = {i: socket_path(rundir, i) for i in range(count) if i != index}

    async def ask(self, method: str, path: str, headers: Mapping[str, str], *,
                  timeout_s: float = ASK_TIMEOUT_S) -> dict[int, httpx.Response | None]:
        """The same request to every other worker, at once: worker index -> its answer (None: not answering,
        e.g. restarting after a crash)."""
        forward = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        forward[LOCAL] = "1"

        async def one(path_to: Path) -> httpx.Response | None:
            try:
                async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path_to)),
                                             timeout=timeout_s) as client:
                    return await client.request(method, "http://kiln" + path, headers=forward)
            except httpx.HTTPError:
                return None

        answers = await asyncio.gather(*(one(p) for p in self.others.values()))
        return dict(zip(self.others, answers))

    async def statistics(self, doc: dict[str, Any], path: str, headers: Mapping[str, str]
                         ) -> tuple[dict[str, Any], dict[int, httpx.Response | None]]:
        """This worker's statistics document (of `path`) merged with the other workers': the whole server's."""
        answers = await self.ask("GET", path, headers)
        docs = [doc] + [r.json() for r in answers.values() if r is not None and r.status_code == 200]
        return merge_statistics(docs), answers


def merge_statistics(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """KServe v2 statistics of several workers -> one document: counts and times summed per model and version,
    batch statistics per batch size, the latest last_inference."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        for s in doc.get("model_stats", []):
            key = (s["name"], s["version"])
            t = merged.get(key)
            if t is None:
                merged[key] = copy.deepcopy(s)
                continue
            t["last_inference"] = max(t["last_inference"], s["last_inference"])
            t["inference_count"] += s["inference_count"]
            t["execution_count"] += s["execution_count"]
            for k, v in s["inference_stats"].items():
                into = t["inference_stats"].setdefault(k, {"count": 0, "ns": 0})
                into["count"] += v["count"]
                into["ns"] += v["ns"]
            sizes = {b["batch_size"]: b for b in t["batch_stats"]}
            for b in s["batch_stats"]:
                if b["batch_size"] not in sizes:
                    sizes[b["batch_size"]] = copy.deepcopy(b)
                    continue
                into = sizes[b["batch_size"]]
                for k in ("compute_input", "compute_infer", "compute_output"):
                    into[k]["count"] += b[k]["count"]
                    into[k]["ns"] += b[k]["ns"]
            t["batch_stats"] = [sizes[k] for k in sorted(sizes)]
    return {"model_stats": list(merged.values())}


def merge_metrics(texts: dict[int, str]) -> bytes:
    """Prometheus text of several workers (worker index -> text) -> one exposition: counters and histograms
    summed per label set (their `_created` is the earliest), SUMMED_GAUGES summed, other gauges kept per worker
    with a `worker` label (a drift-watch figure of one worker is not additive)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            into = values[fam.name]
            per_worker = (fam.type in ("gauge", "unknown") and fam.name not in SUMMED_GAUGES
                          and not fam.name.endswith("_created"))  # a counter's start time, a gauge family in 0.0.4
            for s in fam.samples:
                labels = {**s.labels, "worker": str(index)} if per_worker else s.labels
                key = (s.name, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = s.value
                elif s.name.endswith("_created"):
                    into[key] = min(into[key], s.value)
                else:
                    into[key] += s.value
    for name, fam in families.items():
        for (sample, label_items), value in values[name].items():
            fam.add_sample(sample, dict(label_items), value)

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_ready(own: dict[str, Any], index: int, answers: dict[int, httpx.Response | None]) -> dict[str, Any]:
    """/v2/health/ready of every worker -> ready when all are; each reason says which worker it is from."""
    reasons = {f"worker {index}: {k}": v for k, v in own.get("reasons", {}).items()}
    for i, r in sorted(answers.items()):
        if r is None:
            reasons[f"worker {i}"] = "not answering (starting, or restarting after a crash)"
        elif r.status_code != 200:
            reasons.update({f"worker {i}: {k}": v for k, v in _json(r).get("reasons", {"ready": "false"}).items()})
    ready = own.get("ready", False) and not reasons
    return {"ready": True} if ready else {"ready": False, "reasons": reasons}


def merge_fidelity(own: dict[str, Any], index: int, answers: dict[int, httpx.Response | None]) -> dict[str, Any]:
    """Drift-watch reports of every worker: each samples its own requests, so the figures stay per worker (under
    "workers"); sample counts are summed, and the server is ok when every worker is."""
    reports = {index: own} | {i: _json(r) for i, r in answers.items() if r is not None and r.status_code == 200}
    merged = dict(own)
    for key in ("samples", "dropped", "failed"):
        merged[key] = sum(int(rep.get(key, 0)) for rep in reports.values())
    merged["problems"] = [f"worker {i}: {p}" for i, rep in sorted(reports.items()) for p in rep.get("problems", [])]
    merged["ok"] = all(rep.get("ok", False) for rep in reports.values())
    merged["workers"] = [{"worker": i, **rep} for i, rep in sorted(reports.items())]
    return merged


def first_failure(answers: dict[int, httpx.Response | None]) -> tuple[int, str, int] | None:
    """(worker, error, status) of the first worker that did not answer 200, if any."""
    for i, r in sorted(answers.items()):
        if r is None:
            return i, "not answering (starting, or restarting after a crash); retry", 503
        if r.status_code != 200:
            return i, str(_json(r).get("error", r.text)), r.status_code
    return None


def answered(answers: dict[int, httpx.Response | None], count: int) -> str:
    return f"{1 + sum(r is not None and r.status_code == 200 for r in answers.values())}/{count}"


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        doc = r.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
