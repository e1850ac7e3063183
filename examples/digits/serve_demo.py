"""Serve a built digits model with `kiln serve`, send real requests (JSON and binary), stop the server.

    python examples/digits/serve_demo.py --repo models
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default="models")
    p.add_argument("--count", type=int, default=8, help="test digits to send each way")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kiln", "serve", args.repo, "--port", str(port), "--models", "digits"])
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print("the server exited before it was ready", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print("the server did not become ready within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        test = np.load(HERE / "test.npz")
        x, y = test["image"][: args.count], test["labels"][: args.count]
        json_preds, binary_preds = [], []
        for img in x:  # JSON: one request per digit
            body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": img.ravel().tolist()}]}
            r = httpx.post(f"{url}/v2/models/digits/infer", json=body)
            r.raise_for_status()
            json_preds.append(int(np.argmax(r.json()["outputs"][0]["data"])))
        # Binary tensor data extension: the whole batch in one request, logits back as raw float32.
        head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        r = httpx.post(f"{url}/v2/models/digits/infer", content=head + x.astype("<f4").tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
        r.raise_for_status()
        n = int(r.headers["Inference-Header-Content-Length"])
        binary_preds = np.frombuffer(r.content[n:], "<f4").reshape(len(x), 10).argmax(1).tolist()
        print(f"\nkiln serve on {url}: {len(x)} JSON requests and 1 binary request of {len(x)} digits")
        print("digit  label  JSON  binary")
        for i, (label, a, b) in enumerate(zip(y, json_preds, binary_preds)):
            print(f"{i:5d}  {label:5d}  {a:4d}  {b:6d}  {'ok' if a == b == label else 'MISS'}")
        right = sum(int(a == label) for a, label in zip(json_preds, y))
        print(f"{right}/{len(x)} correct; JSON and binary agree: {json_preds == binary_preds}")
        return 0 if json_preds == binary_preds else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
