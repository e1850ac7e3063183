"""The engine link's framing alone: frames (header length, data length, JSON header, data) that arrive split
across reads or several in one read, as a Unix socket may deliver them. The engines end to end are in
test_workers.py."""

from __future__ import annotations

from typing import Any

from kiln.server.engine import _frame, _Frames


class Collect(_Frames):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[dict[str, Any], bytes]] = []

    def frame(self, doc: dict[str, Any], data: bytes) -> None:
        self.got.append((doc, data))


def test_frames_split_across_reads_and_packed_into_one_are_each_handled_once() -> None:
    frames = [({"id": 1, "op": "infer", "inputs": [[0, [2, 3], "<f4"]]}, b""),
              ({"id": 2, "outputs": [[[2], "<f4"]]}, b"\x00\x01" * 4),
              ({"id": 3, "error": "queue full", "kind": "QueueFull"}, b"")]
    wire = b"".join(_frame(doc, len(data)) + data for doc, data in frames)
    for step in (1, 3, 7, len(wire)):  # byte by byte, odd cuts, all at once
        c = Collect()
        for i in range(0, len(wire), step):
            c.data_received(wire[i:i + step])
        assert c.got == frames, step
        assert not c.buf  # nothing left over


def test_cpu_lists_parse_and_print_back() -> None:
    from kiln.server.engine import _ranges, cpulist

    assert cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert _ranges(cpulist("0-3,8,10-11")) == "0-3,8,10-11" and _ranges({5}) == "5"
    assert cpulist("") == set()


def test_an_engine_off_cuda_or_told_not_to_stays_where_the_scheduler_puts_it(monkeypatch: Any) -> None:
    from kiln.server.engine import pin_to_device

    assert pin_to_device("cpu") is None
    monkeypatch.setenv("KILN_ENGINE_AFFINITY", "0")
    assert pin_to_device("cuda:0") is None
