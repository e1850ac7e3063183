"""schemathesis over the OpenAPI that `kiln serve` publishes: whatever it generates, no response is a 5xx.

Bounded: a few examples per operation, against a real server on loopback with its own repository copy (the fuzzer
may unload models)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev extra (pip install 'kiln[dev]')")
from hypothesis import HealthCheck, settings  # noqa: E402

from kiln.server.app import create_app  # noqa: E402
from kiln.server.dataplane import DataPlane  # noqa: E402

from .conftest import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(serve_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("fuzz")
    for name in ("digits", "two"):
        shutil.copytree(serve_repo / name, repo / name)
    with ServerThread(create_app(DataPlane(repo), max_body_bytes=1 << 20)) as s:
        yield s


def test_no_response_is_a_server_error(fuzz_server: ServerThread) -> None:
    """Every operation of /openapi.json, a dozen generated requests each (fixed seed): none may answer >= 500."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=op.as_strategy())
        def run(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        run()
    assert operations >= 12
    assert not failures, "\n".join(failures[:10])
