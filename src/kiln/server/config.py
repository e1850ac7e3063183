"""Per-model serving settings: repo/<model>/config.toml, overridden by the command line."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import KilnError


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1)
    """Most rows one execution takes; a request with more rows is refused with 400."""
    max_delay_ms: float = Field(2.0, ge=0)
    """How long a batch waits for company, counted from its first request's arrival."""
    adaptive_batching: bool = True
    """Stop waiting once a batch holds as many requests as were recently in flight at once (a lone
    client never waits); false waits out max_delay_ms whenever the batch is not full."""
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Row counts at which a batch runs at once instead of waiting out max_delay_ms."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests waiting beyond this are answered 429 with Retry-After."""
    timeout_ms: float = Field(30_000, gt=0)
    """Default per-request deadline (504 after it); a client may ask for less with the kiln-timeout-ms header."""
    instances: int = Field(1, ge=1)
    """Model instances per device, each running one batch at a time."""
    devices: list[str] = Field(default_factory=lambda: ["cpu"])
    """One or more devices (cpu, cuda:0, cuda:1 ...); `instances` runners are made on each."""
    version: int | None = None
    """Serve this version instead of the latest."""
    variant: str | None = None
    """Serve this variant instead of the selected one."""
    threads: int | None = Field(None, ge=1)
    """Intra-op threads of each instance's runtime (ONNX Runtime's pool; torch's is per process). Default: the
    runtime's own (every core); with `kiln serve --workers N`, the cores divided among the workers."""
    spin: bool = False
    """Let the runtime's idle intra-op threads busy-wait for the next operator (ONNX Runtime's allow_spinning). Off
    by default: a spinning pool burns the CPU that the HTTP front end needs (bench/serve.py, tiny conv, binary
    c=64: 0.70 CPU s per 1,000 requests before, 0.29 with it off; JSON c=64: 1.24 and 0.55)."""
    allow_nonfinite: bool = False
    """Accept NaN/inf in float inputs (refused with 400 by default)."""
    shadow_rate: float = Field(0.0, ge=0, le=1)
    """Drift watch: this fraction of requests also runs through the fp32 reference variant, off the hot path."""

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one device")
        return v


def load_config(model_dir: Path, overrides: dict[str, Any], defaults: dict[str, Any] | None = None) -> ModelConfig:
    """`defaults`, then config.toml beside the model's versions, then the non-None command-line overrides."""
    data: dict[str, Any] = dict(defaults or {})
    f = model_dir / "config.toml"
    if f.is_file():
        try:
            data.update(tomllib.loads(f.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise KilnError(f"cannot parse {f}: {e}", hint="fix the TOML syntax") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ModelConfig(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise KilnError(f"invalid serving config for {model_dir.name}: {problems}",
                        hint=f"see the fields of ModelConfig; settings live in {f}") from None
