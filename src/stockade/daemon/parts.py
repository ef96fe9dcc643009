"""What the controller's parts (oneshot.py, held.py, held_calls.py, background.py) call of the
controller itself (controller.py), declared once for the type checker.

Each part is a mixin of ``Controller``; at run time the controller's own methods are found, and
nothing is defined here that could shadow them (the declarations exist only while type checking).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policy import Policy
    from ..protocol.models import Caller
    from ..result import ExecResult
    from .controller import ExecutionListener
    from .held import Held


class ControllerCalls:
    if TYPE_CHECKING:

        def runtime_for(self, policy: Policy) -> str: ...
        def _track(self, delta: int) -> None: ...
        async def _take_slot(self, caller: Caller) -> None: ...
        def _observe(
            self, caller: Caller, agent_id: str | None, result: ExecResult, held: Held | None = None
        ) -> None: ...
        def _tell(self, event: Callable[[ExecutionListener], None]) -> None: ...
