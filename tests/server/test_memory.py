"""kiln.server.run.keep_freed_memory: what glibc does with freed request bodies, with and without it."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

# Four 9.6 MB bodies (16 images of 3x224x224 fp32) alive at once, as a worker holds a few bodies in flight, then
# freed; the minor page faults per body of the later rounds.
SCRIPT = """
import resource, sys
from kiln.server.run import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
parts = [b"x" * (64 << 10)] * 150
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    bodies = [b"".join(parts) for _ in range(4)]; del bodies
f0 = faults()
for _ in range(10):
    bodies = [b"".join(parts) for _ in range(4)]; del bodies
print(kept, (faults() - f0) / 40)
"""


def _faults_per_body(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "KILN_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    return kept, float(faults)


def test_freed_bodies_are_reused_without_page_faults() -> None:
    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    kept, faults = _faults_per_body("keep")
    assert kept == "True" and faults < 50, faults
    kept, faults = _faults_per_body("default")
    assert faults > 1000, f"glibc's defaults no longer fault bodies back in ({faults}/body): the setting may be moot"


def test_the_user_can_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.server.run import keep_freed_memory

    monkeypatch.setenv("KILN_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("KILN_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
