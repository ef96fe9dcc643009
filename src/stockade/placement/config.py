"""One config per placement backend, chosen by its ``type`` (``STOCKADE_PLACEMENT``).

Standard-library dataclasses: the settings of every stockade process hold one,
and most never place anywhere but here, so building the default needs no
pydantic. ``parse_placement`` checks a config given as text or a dict with
pydantic, which reads the bounds from the fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..checked import describe
from ..errors import ConfigError

MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class LocalPlacementConfig:
    """Isolates on this host, from its own runtimes and warm pools (the default)."""

    __pydantic_config__ = {"extra": "forbid"}

    type: Literal["local"] = "local"
    pool_size: int | None = field(
        default=None, metadata=describe("warm isolates per runtime (None: settings)", ge=0, le=64)
    )


@dataclass(frozen=True, kw_only=True)
class RayPlacementConfig:
    """Isolates on the nodes of a Ray cluster, each node's kernel enforcing every limit."""

    __pydantic_config__ = {"extra": "forbid"}

    type: Literal["ray"]
    address: str = field(metadata=describe("the cluster's GCS, host:port, or 'auto'", min_length=1))
    namespace: str = field(
        default="stockade", metadata=describe("its Ray namespace", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    )
    pool_size: int = field(default=2, metadata=describe("warm isolates per runtime on each node", ge=0, le=64))
    kept_reservations: int = field(
        default=16,
        metadata=describe(
            "placement groups released isolates leave booked for the next claim of their shape (0: none)",
            ge=0,
            le=1024,
        ),
    )
    claim_timeout: float = field(default=30.0, metadata=describe("seconds an acquire waits for room", gt=0, le=600))
    max_file_bytes: int = field(
        default=MAX_FILE_BYTES, metadata=describe("a file call's bytes at most", ge=1, le=1 << 30)
    )


PlacementConfig = LocalPlacementConfig | RayPlacementConfig
_adapter: Any = None


def parse_placement(value: str | dict[str, Any] | None) -> PlacementConfig:
    """A placement config from JSON, a bare backend name (``local``) or a dict; errors name the field."""
    global _adapter
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
    from typing import Annotated

    from pydantic import Field, TypeAdapter, ValidationError

    if _adapter is None:
        _adapter = TypeAdapter(Annotated[LocalPlacementConfig | RayPlacementConfig, Field(discriminator="type")])
    try:
        config: PlacementConfig = _adapter.validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'type'}: " + _problem(err) for err in exc.errors()
        )
        raise ConfigError(f"placement: {problems}") from None
    return config


def _problem(err: Any) -> str:
    """One validation error in the words of a placement's settings."""
    if err["type"] == "unexpected_keyword_argument":
        return "unknown field"
    if err["type"] == "union_tag_invalid":
        return f"{err['ctx']['tag']!r} is no placement (local, or ray with its address)"
    return str(err["msg"])
