"""Where an isolate runs: the placement seam (docs/scale-out.md).

``open_placement(config)`` gives a ``Placement``; ``await placement.acquire(policy)``
gives an ``Isolate`` (async ``exec``, ``run_code``, file calls, ``aclose``), on this
host (``local``) or on a node of a Ray cluster (``ray``). The Policy, the results
and the isolation are the same either way: only where the isolate lands changes.
"""

from __future__ import annotations

from .config import LocalPlacementConfig, PlacementConfig, RayPlacementConfig, parse_placement

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .base import Isolate, Placement, one_shot


def __getattr__(name: str) -> object:
    # base.py (and the logging it brings) loads on first use: every process's settings hold a
    # placement config (config.py), and the CLI reads its settings before its isolate is begun.
    if name in ("Isolate", "Placement", "one_shot"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Isolate",
    "LocalPlacementConfig",
    "Placement",
    "PlacementConfig",
    "RayPlacementConfig",
    "one_shot",
    "open_placement",
    "parse_placement",
]


def open_placement(config: PlacementConfig | dict[str, object] | str | None = None) -> Placement:
    """The placement ``config`` describes (a model, a dict, JSON, or None for ``settings.placement``)."""
    if config is None:
        from ..settings import current

        config = current().placement
    if not isinstance(config, LocalPlacementConfig | RayPlacementConfig):
        config = parse_placement(config)
    if isinstance(config, RayPlacementConfig):
        from .ray import RayPlacement

        return RayPlacement(config)
    from .local import LocalPlacement

    return LocalPlacement(config)
