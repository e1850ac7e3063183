from pathlib import Path

import pytest

from kiln.bench.advice import advise, write_config
from kiln.errors import KilnError
from kiln.server.config import load_config

CURVE = [(1, 0.5, 1.0), (8, 1.5, 3.0), (32, 4.0, 8.0), (64, 7.0, 15.0)]


def test_largest_batch_that_fits() -> None:
    a = advise(CURVE, 20)  # budget 16 ms: 2 x p99 fits up to batch 32 (16 ms)
    assert a.max_batch_size == 32 and a.max_delay_ms == 0.0
    b = advise(CURVE, 10)  # budget 8 ms: batch 8 (6 ms), 2 ms left, capped at batch 8's p50 1.5 ms
    assert b.max_batch_size == 8 and b.max_delay_ms == 1.5 and b.expected_p99_ms <= 10
    assert advise(CURVE, 100).max_batch_size == 64


def test_impossible_target() -> None:
    with pytest.raises(KilnError, match="cannot be met"):
        advise(CURVE, 1)


def test_config_is_merged_and_readable(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('instances = 2\ndevices = ["cpu"]\nmax_batch_size = 4\n')
    write_config(tmp_path, advise(CURVE, 10))
    cfg = load_config(tmp_path, {})
    assert (cfg.max_batch_size, cfg.max_delay_ms, cfg.instances, cfg.devices) == (8, 1.5, 2, ["cpu"])
    assert (tmp_path / "config.toml").read_text().startswith("# max_batch_size and max_delay_ms written by kiln bench")
