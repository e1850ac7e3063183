"""Paths the tests share (conftest modules are not importable by name once there are two)."""

from __future__ import annotations

from pathlib import Path

import zoo

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(zoo.__file__).resolve()
DIGITS = ROOT / "examples" / "digits"
