"""Against an existing Ray cluster (started here with `ray start --head`): predict --ray ADDRESS, and
kiln.ray.deployment() composed into the user's own Ray Serve application."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import DIGITS
from tests.on_ray.test_serve import check_v2
from tests.server.conftest import free_port

ray = pytest.importorskip("ray", reason="make test installs kiln[ray]")
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A one-node cluster on loopback only. Token auth is off: nothing outside this machine can reach it."""
    port = free_port()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # for the drivers this test starts too
    for _ in range(2):  # `ray start` on a loaded 2-core machine once gave up (exit 1) while starting its daemons
        p = subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats"], capture_output=True, text=True,
                           timeout=120)
        if p.returncode == 0:
            break
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    else:
        pytest.fail(f"ray start failed twice: {(p.stdout + p.stderr)[-3000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        mp.undo()


def test_predict_on_an_existing_cluster(cluster: str, digits_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.npz"
    p = subprocess.run([sys.executable, "-m", "kiln", "predict", str(digits_repo), str(DIGITS / "test.npz"), "--out",
                        str(out), "--batch", "100", "--ray", cluster, "--replicas", "2", "-q"],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wrote 450 of 450 items" in p.stdout and "ray" in p.stdout
    z = np.load(out)
    test = np.load(DIGITS / "test.npz")
    assert len(set(z["id"])) == 450 and (z["output"].argmax(1) == test["labels"]).mean() > 0.97


def test_compose_the_deployment(cluster: str, serve_repo: Path) -> None:
    from ray import serve

    import kiln.ray

    port = free_port()
    ray.init(address=cluster, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(kiln.ray.deployment(serve_repo, models=["two"], cpus_per_replica=0.5, max_replicas=2),
                  name="mine", route_prefix="/")
        check_v2(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
