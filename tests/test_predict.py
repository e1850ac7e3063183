"""kiln predict: every item once, equal to per-item eager outputs, resumable after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import kiln
import zoo
from kiln.predict import predict
from support import DIGITS, ZOO


def eager_per_item(repo_model: Path, x: np.ndarray) -> np.ndarray:
    runner = kiln.load(str(repo_model), variant="eager/fp32")
    return np.concatenate([runner(x[i:i + 1]) for i in range(len(x))])


def test_npz_equals_per_item_eager(digits_repo: Path, tmp_path: Path) -> None:
    test = np.load(DIGITS / "test.npz")
    s = predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "p.npz", batch=37, workers=2, shard_size=100, progress=False)
    assert (s.items, s.written, s.skipped) == (450, 450, [])
    z = np.load(tmp_path / "p.npz")
    assert list(z["id"][:2]) == [f"{DIGITS / 'test.npz'}:0", f"{DIGITS / 'test.npz'}:1"] and len(set(z["id"])) == 450
    np.testing.assert_allclose(z["output"], eager_per_item(digits_repo, test["image"]), rtol=1e-4, atol=1e-5)
    assert (z["output"].argmax(1) == test["labels"]).mean() > 0.97
    assert not (tmp_path / "p.npz.parts").exists()


def test_several_devices_run_side_by_side(digits_repo: Path, tmp_path: Path) -> None:
    """`--device cpu,cpu` (as `cuda` does with every GPU): one runner per device, each in its own thread, every item
    written once, the same outputs as one device; a failing device stops the run with its error."""
    from kiln.predict import devices_of

    assert devices_of("cuda:0,cuda:1") == ["cuda:0", "cuda:1"] and devices_of("cpu") == ["cpu"]
    one = predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "one.npz", batch=16, shard_size=64, progress=False)
    two = predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "two.npz", batch=16, shard_size=64, device="cpu,cpu",
                  workers=1, progress=False)
    assert (one.written, two.written) == (450, 450)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert list(a["id"]) == list(b["id"])
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-5, atol=1e-6)
    with pytest.raises(kiln.KilnError, match="no device"):
        predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "x.npz", device=",", progress=False)


def test_corrupt_npz_files_are_skipped_and_listed(digits_repo: Path, tmp_path: Path) -> None:
    """A truncated archive and one with a flipped byte inside a member (bad CRC) are listed, the rest is written."""
    x = np.load(DIGITS / "test.npz")["image"][:10]
    good = tmp_path / "good.npz"
    np.savez(good, image=x)
    raw = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF  # inside the stored array: the zip's CRC check fails on read
    (tmp_path / "badcrc.npz").write_bytes(bytes(flipped))
    s = predict(digits_repo, [good, tmp_path / "truncated.npz", tmp_path / "badcrc.npz"], tmp_path / "p.npz",
                on_error="skip", progress=False)
    assert (s.items, s.written, s.skipped) == (10, 10, [])
    assert sorted(Path(f).name for f, _ in s.ignored) == ["badcrc.npz", "truncated.npz"]
    assert all("cannot read" in e for _, e in s.ignored)
    with pytest.raises(kiln.KilnError, match="truncated.npz"):
        predict(digits_repo, [good, tmp_path / "truncated.npz"], tmp_path / "q.npz", on_error="stop", progress=False)


def test_image_folder_with_bad_files(digits_repo: Path, tmp_path: Path) -> None:
    x = np.load(DIGITS / "test.npz")["image"][:12]
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.round(x[:, 0] * 255).astype(np.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img, mode="L").save(folder / f"{i:02d}.png")
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("hello")
    s = predict(digits_repo, [folder], tmp_path / "p.parquet", batch=5, progress=False)
    assert (s.items, s.written) == (13, 12) and [Path(p).name for p, _ in s.skipped] == ["zz-broken.png"]
    assert "unreadable image" in s.skipped[0][1] and [Path(p).name for p, _ in s.ignored] == ["notes.txt"]
    assert s.notes == []  # digits' kiln.toml has [preprocess], and the images are its size
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.column_names == ["id", "output"] and [Path(i).name for i in t.column("id").to_pylist()][:2] == ["00.png", "01.png"]
    got = np.asarray(t.column("output").to_pylist(), np.float32)
    want = eager_per_item(digits_repo, (pixels.astype(np.float32) / 255.0)[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    (folder / "notes.txt").unlink()
    with pytest.raises(kiln.KilnError, match="zz-broken.png: unreadable image"):
        predict(digits_repo, [folder], tmp_path / "q.npz", on_error="stop", progress=False)


def test_tables(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    cols = {f"f{i:02d}": x[:, i] for i in range(16)}
    pq.write_table(pa.table({"name": [f"row{i}" for i in range(30)], **cols}), tmp_path / "t.parquet")
    pcsv.write_csv(pa.table(cols), tmp_path / "t.csv")
    with torch.no_grad():
        want = zoo.seeded(zoo.MLP)(torch.from_numpy(x)).numpy()
    for name in ("t.parquet", "t.csv"):
        # fp32 named: the build may select an int8 variant, which is close to eager but not equal
        s = predict(built("MLP").path, [tmp_path / name], tmp_path / f"{name}.npz", batch=8, variant="onnxruntime/fp32",
                    progress=False)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npz")["output"], want, rtol=1e-4, atol=1e-5)
        assert s.written == 30
    pq.write_table(pa.table({"a": x[:, 0]}), tmp_path / "narrow.parquet")
    with pytest.raises(kiln.KilnError, match="1 numeric columns"):  # the first table decides the columns
        predict(built("MLP").path, [tmp_path / "narrow.parquet", tmp_path / "t.parquet"], tmp_path / "n.npz", progress=False)
    s = predict(built("MLP").path, [tmp_path / "t.parquet", tmp_path / "narrow.parquet"], tmp_path / "n.npz", progress=False)
    assert s.written == 30 and "lacks columns" in s.ignored[0][1]


def test_tables_by_column_name_with_ids_and_missing_values(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Columns are matched by name (a later file in another order gives the same predictions), an id column is
    carried through, a row with a missing or NaN value is skipped with the column named, and the counts add up."""
    x = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    names = [f"f{i:02d}" for i in range(16)]
    with torch.no_grad():
        want = zoo.seeded(zoo.MLP)(torch.from_numpy(x)).numpy()
    first = {"id": [f"cust-{i}" for i in range(6)], **{n: x[:6, i] for i, n in enumerate(names)}}
    pq.write_table(pa.table(first), tmp_path / "a.parquet")
    shuffled = list(reversed(names))  # same features, other column order
    second = {**{n: x[6:, names.index(n)] for n in shuffled}, "id": [f"cust-{i}" for i in range(6, 12)]}
    second["f03"] = pa.array([*x[6:9, 3].tolist(), None, *x[10:, 3].tolist()], pa.float32())  # row 9: missing
    pq.write_table(pa.table(second), tmp_path / "b.parquet")
    out = tmp_path / "p.parquet"
    s = predict(built("MLP").path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], out, variant="onnxruntime/fp32",
                progress=False)
    assert (s.items, s.written, len(s.skipped)) == (12, 11, 1) and s.ignored == []
    assert s.skipped[0][0] == "cust-9" and "column f03" in s.skipped[0][1]
    assert any("other files are matched by these names" in n for n in s.notes)
    t = pq.read_table(out)
    ids = t.column("id").to_pylist()
    assert ids == [f"cust-{i}" for i in range(12) if i != 9]
    np.testing.assert_allclose(np.asarray(t.column("output").to_pylist()), np.delete(want, 9, axis=0), rtol=1e-4, atol=1e-5)
    # declared columns pick and order by name; extra columns are ignored and said
    pq.write_table(pa.table({"note": ["x"] * 12, **{n: x[:, i] for i, n in enumerate(names)}, "extra": np.ones(12)}),
                   tmp_path / "c.parquet")
    s = predict(built("MLP").path, [tmp_path / "c.parquet"], tmp_path / "c.npz", variant="onnxruntime/fp32",
                columns={"x": names}, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "c.npz")["output"], want, rtol=1e-4, atol=1e-5)
    assert any("not used: note, extra" in n for n in s.notes)
    with pytest.raises(kiln.KilnError, match="columns declared for \\['y'\\]"):
        predict(built("MLP").path, [tmp_path / "c.parquet"], tmp_path / "d.npz", columns={"y": names})


def test_multi_input_tables_and_multi_dim_outputs(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each input from the column of its name (list columns for vectors); a [batch, seq, 32] output keeps its
    shape in parquet as nested lists."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    pq.write_table(pa.table({"b": list(b), "a": list(a)}), tmp_path / "two.parquet")
    predict(built("TwoInTwoOut").path, [tmp_path / "two.parquet"], tmp_path / "two.npz", variant="eager/fp32",
            progress=False)
    want = kiln.load(built("TwoInTwoOut").path, variant="eager/fp32")(a, b)
    np.testing.assert_allclose(np.load(tmp_path / "two.npz")["score"], want["score"], rtol=1e-5)
    ids = rng.integers(0, 100, (4, 7))
    np.savez(tmp_path / "enc.npz", ids=ids, mask=np.ones_like(ids))
    predict(built("Encoder").path, [tmp_path / "enc.npz"], tmp_path / "enc.parquet", variant="eager/fp32", progress=False)
    col = pq.read_table(tmp_path / "enc.parquet").column("output0")
    assert (col.type.list_size, col.type.value_type.list_size) == (7, 32)
    got = np.asarray(col.to_pylist(), np.float32)
    want0 = kiln.load(built("Encoder").path, variant="eager/fp32")(ids, np.ones_like(ids))[0]
    np.testing.assert_allclose(got, want0, rtol=1e-5, atol=1e-6)


def test_images_of_other_sizes_are_resized_and_a_missing_preprocess_is_said(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(16, 16), (20, 24), (40, 32)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), mode="RGB").save(folder / f"{i}.png")
    s = predict(built("ConvBN").path, [folder], tmp_path / "p.npz", progress=False)
    assert (s.items, s.written, s.skipped) == (3, 3, [])
    assert "has no [preprocess]" in s.notes[0] and "2 of 3 images are not 16x16" in s.notes[1]
    with Image.open(folder / "1.png") as im:
        x = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR), np.float32) / 255
    want = kiln.load(built("ConvBN").path, variant="eager/fp32")(x.transpose(2, 0, 1)[None])
    np.testing.assert_allclose(np.load(tmp_path / "p.npz")["output"][1], want[0], rtol=1e-4, atol=1e-5)


def test_bad_arguments(digits_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(kiln.KilnError, match="unknown output format"):
        predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "p.csv")
    with pytest.raises(kiln.KilnError, match="input not found"):
        predict(digits_repo, [tmp_path / "nothing"], tmp_path / "p.npz")
    np.savez(tmp_path / "wrong.npz", image=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(kiln.KilnError, match="wrong.npz: array 'image' has shape"):
        predict(digits_repo, [tmp_path / "wrong.npz"], tmp_path / "p.npz", on_error="stop")
    with pytest.raises(kiln.KilnError, match="no readable input items .*wrong.npz"):
        predict(digits_repo, [tmp_path / "wrong.npz"], tmp_path / "p.npz", on_error="skip")


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("slow")
    kiln.build(f"{ZOO}:Slow", inputs=zoo.SERVE_SPECS["Slow"], name="slow", repo=repo, backends=("eager",),
               batch=(1,))
    return repo / "slow"


def test_killed_run_resumes_with_every_item_once(slow_repo: Path, tmp_path: Path) -> None:
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "p.npz"
    cmd = [sys.executable, "-m", "kiln", "predict", str(slow_repo), str(tmp_path / "in.npz"), "--out", str(out),
           "--batch", "4", "--shard-size", "8", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "p.npz.parts" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["done"]) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(manifest.read_text())["done"])
    assert not out.exists() and 2 <= done < 5
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--resume" in p.stderr
    p = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"({done * 8} from the earlier run)" in p.stdout
    z = np.load(out)
    assert list(z["id"]) == [f"{tmp_path / 'in.npz'}:{i}" for i in range(40)]
    np.testing.assert_array_equal(z["output"], x + 1.0)


def test_ray_data_gives_the_same_outputs(digits_repo: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="make test installs kiln[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    try:
        s = predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "r.npz", batch=64, shard_size=128, ray=True,
                    replicas=2, progress=False)
    finally:
        ray.shutdown()
    assert s.engine == "ray" and s.written == 450
    local = predict(digits_repo, [DIGITS / "test.npz"], tmp_path / "l.npz", batch=64, progress=False)
    assert local.written == 450
    a, b = np.load(tmp_path / "r.npz"), np.load(tmp_path / "l.npz")
    assert list(a["id"]) == list(b["id"])
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-6)
