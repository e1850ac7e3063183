"""KServe v2 over gRPC (`GRPCInferenceService`), beside HTTP, on the same DataPlane: the same batcher, validation,
limits, API key and metrics. Runs on the server's event loop (grpc.aio), so a gRPC request joins the same batches.

The protocol's messages come from the generated modules that ship with `tritonclient[grpc]` (the KServe v2 proto
is Triton's `grpc_service.proto`): `pip install 'kiln[grpc]'`.

    server = await start(plane, port=8001, api_key=None, max_message_bytes=64 << 20)
"""

from __future__ import annotations

import hmac
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.server.codec import DATATYPES, NUMPY, BadRequest
from kiln.server.dataplane import DataPlane, internal_error

_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
             "INT16": "int_contents", "INT8": "int_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents"}


def _modules() -> tuple[Any, Any, Any, Any]:
    try:
        import grpc
        from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
    except ImportError:
        raise KilnError("gRPC serving needs grpcio and the KServe v2 protocol modules",
                        hint="pip install 'kiln[grpc]' (grpcio and tritonclient[grpc])") from None
    return grpc, service_pb2, service_pb2_grpc, model_config_pb2


def _code(grpc: Any, status: int) -> Any:
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
            413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
            499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
            504: grpc.StatusCode.DEADLINE_EXCEEDED}.get(status, grpc.StatusCode.INTERNAL)


def make_servicer(plane: DataPlane, *, api_key: str | None = None, peers: Any = None) -> Any:
    """The GRPCInferenceService implementation over `plane`. With `peers` (one worker of `kiln serve --workers
    N`), ModelStatistics answers for the whole server, as HTTP's statistics do."""
    grpc, pb, pb_grpc, mc = _modules()
    from google.protobuf import json_format

    expected = api_key.encode() if api_key else None

    class Service(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[name-defined]
        async def _guard(self, context: Any, call: Any) -> Any:
            """The API key (`authorization: Bearer KEY` metadata) and the mapping of kiln's errors to gRPC codes."""
            if expected is not None:
                meta = dict(context.invocation_metadata() or ())
                scheme, _, token = str(meta.get("authorization", "")).partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        "missing or wrong API key; send the metadata authorization: Bearer <key>")
            try:
                return await call()
            except BadRequest as e:
                await context.abort(_code(grpc, e.status), str(e))
            except KilnError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message + (f"; {e.hint}" if e.hint else ""))
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                await context.abort(grpc.StatusCode.INTERNAL, str(internal_error(e)))

        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=plane.ready())

        async def ModelReady(self, request: Any, context: Any) -> Any:
            m = plane.models.get(request.name)
            ok = m is not None and m.ready and (not request.version or request.version == m.version)
            return pb.ModelReadyResponse(ready=ok)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            async def call() -> Any:
                d = plane.server_metadata()
                return pb.ServerMetadataResponse(name=d["name"], version=d["version"], extensions=d["extensions"])
            return await self._guard(context, call)

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            async def call() -> Any:
                d = plane.model_metadata(request.name, request.version or None)
                tensors = [[pb.ModelMetadataResponse.TensorMetadata(**t) for t in d[k]] for k in ("inputs", "outputs")]
                return pb.ModelMetadataResponse(name=d["name"], versions=d["versions"], platform=d["platform"],
                                                inputs=tensors[0], outputs=tensors[1])
            return await self._guard(context, call)

        async def ModelConfig(self, request: Any, context: Any) -> Any:
            async def call() -> Any:
                d = plane.model_config(request.name, request.version or None)

                def io(kind: Any, specs: list[dict[str, Any]]) -> list[Any]:
                    return [kind(name=s["name"], data_type=mc.DataType.Value(s["data_type"]), dims=s["dims"]) for s in specs]

                config = mc.ModelConfig(name=d["name"], platform=d["platform"], backend=d["backend"],
                                        max_batch_size=d["max_batch_size"], input=io(mc.ModelInput, d["input"]),
                                        output=io(mc.ModelOutput, d["output"]))
                return pb.ModelConfigResponse(config=config)
            return await self._guard(context, call)

        async def ModelStatistics(self, request: Any, context: Any) -> Any:
            """Triton's statistics extension (what perf_analyzer reads after a run), the HTTP document's fields."""
            async def call() -> Any:
                name, version = request.name or None, request.version or None
                doc = plane.statistics(name, version)
                if peers is not None:
                    path = "/v2/models/stats" if name is None else (
                        f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/stats")
                    meta = {k: v for k, v in (context.invocation_metadata() or ()) if k == "authorization"}
                    doc, _ = await peers.statistics(doc, path, meta)
                return json_format.ParseDict(doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
            return await self._guard(context, call)

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            async def call() -> Any:
                doc, tail = _request_doc(request)
                left = context.time_remaining()
                timeout_ms = str(left * 1e3) if left is not None and left > 0 else None
                m, req, outs = await plane.infer_doc(request.model_name, request.model_version or None, doc, tail,
                                                     timeout_ms)
                names = {s.name: i for i, s in enumerate(m.outputs)}
                specs = {s.name: s for s in m.outputs}
                response = pb.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id)
                for name in req.outputs:
                    a = outs[names[name]]
                    dt = DATATYPES[specs[name].dtype] if specs[name].dtype != "bfloat16" else "FP32"
                    response.outputs.append(pb.ModelInferResponse.InferOutputTensor(name=name, datatype=dt,
                                                                                   shape=list(a.shape)))
                    response.raw_output_contents.append(
                        np.ascontiguousarray(a, dtype=np.dtype(NUMPY[dt]).newbyteorder("<")).tobytes())
                return response
            return await self._guard(context, call)

    return Service()


def _request_doc(request: Any) -> tuple[dict[str, Any], memoryview]:
    """A ModelInferRequest as the dict and binary tail that kiln's HTTP codec validates: raw contents become
    binary_data_size inputs, typed contents become `data`."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                         "send one per input, in order")
    inputs = []
    for i, t in enumerate(request.inputs):
        item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
        if raw:
            item["parameters"] = {"binary_data_size": len(raw[i])}
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise BadRequest(f'input "{t.name}": datatype {t.datatype!r} needs raw_input_contents')
            item["data"] = list(getattr(t.contents, field))
        inputs.append(item)
    outputs = [{"name": o.name} for o in request.outputs] or None
    doc: dict[str, Any] = {"inputs": inputs}
    if outputs:
        doc["outputs"] = outputs
    if request.id:
        doc["id"] = request.id
    return doc, memoryview(b"".join(raw))


async def start(plane: DataPlane, *, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                max_message_bytes: int = 64 << 20, peers: Any = None) -> Any:
    """Start the gRPC server on the running event loop; stop it with `await server.stop(grace_s)`."""
    grpc, _, pb_grpc, _ = _modules()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(plane, api_key=api_key, peers=peers), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise KilnError(f"cannot listen for gRPC on {host}:{port}", hint="pick a free port with --grpc-port")
    await server.start()
    return server
