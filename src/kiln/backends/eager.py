"""Eager PyTorch: the fp32 reference, and a variant like any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import Subject, check_device, rebuild_module, require_module, save_python_source
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec

NAME = "eager"


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    require_module(subject, NAME)
    return save_python_source(subject, directory)


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu") -> Runner:
    check_device(device)
    flat = FlatModel(rebuild_module(directory, meta)).to(device)
    return module_runner(flat, f"{NAME}/fp32", inputs, outputs, device)


def module_runner(flat: torch.nn.Module, variant: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  device: str) -> Runner:
    def fn(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return flat(*(x.to(device, non_blocking=True) for x in xs))

    return Runner(variant, inputs, outputs, fn, device)
