"""Train DigitsNet on scikit-learn's bundled digits data set (1,797 real 8x8 scans).

    python examples/digits/train.py      # writes digits.safetensors, train.npz, calib.npz, test.npz here

Splits (fixed seed): 60% train, 15% calibration (for int8 passes), 25% test (verification).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from model import DigitsNet
from safetensors.torch import save_model
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n_train, n_calib = int(0.6 * len(x)), int(0.15 * len(x))
    train, calib, test = np.split(order, [n_train, n_train + n_calib])

    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _epoch in range(40):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    print(f"test accuracy {acc:.4f} on {len(test)} held-out digits")
    save_model(model, str(HERE / "digits.safetensors"))
    np.savez(HERE / "train.npz", image=x[train], labels=y[train])  # for kiln distill
    np.savez(HERE / "calib.npz", image=x[calib], labels=y[calib])
    np.savez(HERE / "test.npz", image=x[test], labels=y[test])


if __name__ == "__main__":
    main()
