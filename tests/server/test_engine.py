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
