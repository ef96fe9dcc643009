"""A stateful interpreter's account of a cell (agent/kernel.py, agent/display.py), read on the host.

The account is untrusted, as everything from inside: the cell's own code can
write it. It is read into ``CellOutput``/``CellException`` models with their
bounds; one that does not fit them is not said (no results), and the run's
output and verdict stand on their own.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from ..agent import display
from ..errors import utf8_text
from ..result import CELL_KINDS, MAX_CELL_MIME_TYPES, MAX_CELL_RESULTS, CellException, CellOutput

# Levels a JSON display value may nest (arrays and objects): past them the host's own encoders (and a
# client's parser) would recurse too deep to answer. Values (keys counted) one cell's JSON results may
# hold in all: past them a result's JSON is left out, its text kept. The agent's kernel keeps within
# both (the same numbers, its own); a cell that writes its own account may not.
MAX_JSON_DEPTH = display.MAX_JSON_DEPTH
MAX_CELL_VALUES = display.MAX_REPLY_VALUES


@dataclass(frozen=True)
class Cell:
    execution_count: int | None
    results: list[CellOutput] = field(default_factory=list)
    exception: CellException | None = None


def read_cell(said: Any) -> Cell | None:
    if not isinstance(said, dict):
        return None
    count = said.get("execution_count")
    outputs = said.get("outputs")
    exception = said.get("exception")
    budget = [MAX_CELL_VALUES]
    try:
        results = [_output(o, budget) for o in outputs[:MAX_CELL_RESULTS]] if isinstance(outputs, list) else []
        raised = _exception(exception) if exception is not None else None
    except ValueError:
        return Cell(execution_count=None)
    return Cell(count if isinstance(count, int) and not isinstance(count, bool) else None, results, raised)


def _output(said: Any, budget: list[int]) -> CellOutput:
    """One display result as the agent reported it, checked (it comes from inside the isolate)."""
    if not isinstance(said, dict) or set(said) != {"kind", "data"}:
        raise ValueError("a cell output is {kind, data}")
    kind, data = said["kind"], said["data"]
    if kind not in CELL_KINDS or not isinstance(data, dict) or len(data) > MAX_CELL_MIME_TYPES:
        raise ValueError("a cell output's kind or data is not one")
    if not all(isinstance(mime, str) for mime in data):
        raise ValueError("a cell output's MIME types are text")
    kept = {}
    for mime, said_value in data.items():
        value = _base64(said_value) if mime in _BASE64_TYPES else said_value
        if value is None and mime in _BASE64_TYPES:
            continue  # an image that is no base64 text is left out (a client would decode it); its text stays
        if isinstance(value, str):
            kept[utf8_text(mime)] = utf8_text(value)
            continue
        size = display.json_values(value, MAX_JSON_DEPTH, budget[0])
        if size is None:
            continue  # that format is left out; the others (its text/plain) stay
        budget[0] -= size
        kept[utf8_text(mime)] = _text_tree(value)
    return CellOutput(kind=kind, data=kept)


_BASE64_TYPES = frozenset({"image/png", "image/jpeg"})


def _base64(value: Any) -> str | None:
    """``value`` as base64 text without its line breaks (``base64.encodebytes`` writes them, and
    IPython takes a ``_repr_png_`` so written), or None when it is not base64."""
    if not isinstance(value, str):
        return None
    bare = "".join(value.split())
    try:
        base64.b64decode(bare, validate=True)
    except ValueError:  # binascii.Error; a character past ASCII
        return None
    return bare


def _exception(said: Any) -> CellException:
    if not isinstance(said, dict) or set(said) != {"name", "value", "traceback"}:
        raise ValueError("a cell exception is {name, value, traceback}")
    if not all(isinstance(v, str) for v in said.values()):
        raise ValueError("a cell exception's fields are text")
    return CellException(**{k: utf8_text(v) for k, v in said.items()})


def _text_tree(value: Any) -> Any:
    """``value`` (checked by ``display.json_values``) with every text as UTF-8 can carry it."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, list):
        return [_text_tree(v) for v in value]
    if isinstance(value, dict):
        return {utf8_text(str(k)): _text_tree(v) for k, v in value.items()}
    return value


def cell_fields(cell: Cell | None, interpreter_lost: bool, error: str | None) -> dict[str, Any]:
    """The ExecResult fields of a cell (none for other runs), its ``error`` included."""
    if cell is None:
        if not interpreter_lost:
            return {"error": error}
        lost = "the session's interpreter ended: its state is lost, and the next cell starts a fresh one"
        return {"error": f"{error}; {lost}" if error else lost}
    return {
        "error": error,
        "results": cell.results,
        "exception": cell.exception,
        "execution_count": cell.execution_count,
    }
