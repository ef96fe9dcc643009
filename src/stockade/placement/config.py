"""One config model per placement backend, chosen by its ``type`` (``STOCKADE_PLACEMENT``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import ConfigError

MAX_FILE_BYTES = 64 * 1024 * 1024


class LocalPlacementConfig(BaseModel):
    """Isolates on this host, from its own runtimes and warm pools (the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["local"] = "local"
    pool_size: int | None = Field(default=None, ge=0, le=64, description="warm isolates per runtime (None: settings)")


class RayPlacementConfig(BaseModel):
    """Isolates on the nodes of a Ray cluster, each node's kernel enforcing every limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["ray"]
    address: str = Field(min_length=1, description="the cluster's GCS, host:port, or 'auto'")
    namespace: str = Field(default="stockade", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    pool_size: int = Field(default=2, ge=0, le=64, description="warm isolates per runtime on each node")
    kept_reservations: int = Field(
        default=16,
        ge=0,
        le=1024,
        description="placement groups released isolates leave booked for the next claim of their shape (0: none)",
    )
    claim_timeout: float = Field(default=30.0, gt=0, le=600, description="seconds an acquire waits for room")
    max_file_bytes: int = Field(default=MAX_FILE_BYTES, ge=1, le=1 << 30, description="a file call's bytes at most")


PlacementConfig = Annotated[LocalPlacementConfig | RayPlacementConfig, Field(discriminator="type")]
_ADAPTER: TypeAdapter[LocalPlacementConfig | RayPlacementConfig] = TypeAdapter(PlacementConfig)


def parse_placement(value: str | dict[str, Any] | None) -> LocalPlacementConfig | RayPlacementConfig:
    """A placement config from JSON, a bare backend name (``local``) or a dict; errors name the field."""
    if value is None or value == "":
        return LocalPlacementConfig()
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            value = {"type": text}
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"placement: not JSON ({exc})") from None
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'type'}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"placement: {problems}") from None
