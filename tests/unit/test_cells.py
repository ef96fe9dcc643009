"""A stateful interpreter's account of a cell, read on the host (runtimes/cells.py): it comes from
inside the isolate, so text UTF-8 cannot carry and nesting no encoder can walk are what a
subverted agent would send."""

from __future__ import annotations

import json
from typing import Any

from stockade.errors import PathNotFoundError, public_message, utf8_text
from stockade.result import ExecResult
from stockade.runtimes.cells import MAX_CELL_VALUES, MAX_JSON_DEPTH, Cell, cell_fields, read_cell


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def said(value: Any) -> dict[str, Any]:
    data = {"text/plain": "v", "application/json": value}
    return {"execution_count": 1, "outputs": [{"kind": "execute_result", "data": data}], "exception": None}


def a_result(cell: Cell) -> ExecResult:
    base = {"success": True, "termination_reason": "completed", "runtime_used": "process", "policy_digest": "x"}
    return ExecResult(**base, **cell_fields(cell, False, None))


def test_json_deeper_than_the_limit_is_not_said_and_the_result_still_encodes() -> None:
    kept = read_cell(said(nested(MAX_JSON_DEPTH)))
    assert kept is not None and kept.results[0].data["application/json"] == nested(MAX_JSON_DEPTH)
    for levels in (MAX_JSON_DEPTH + 1, 5000):
        cell = read_cell(said(nested(levels)))  # that format is left out; its text/plain stays
        assert cell is not None and cell.execution_count == 1 and cell.results[0].data == {"text/plain": "v"}
    result = a_result(kept)
    assert json.loads(result.to_json())["results"][0]["data"]["application/json"] == nested(MAX_JSON_DEPTH)


def test_lone_surrogates_become_escapes_everywhere_a_cell_holds_text() -> None:
    cell = read_cell(
        {
            "execution_count": 2,
            "outputs": [
                {
                    "kind": "display_data",
                    "data": {"text/html": "<b>\udcff</b>", "application/json": {"k\ud800": ["\udc80"]}},
                }
            ],
            "exception": {"name": "E\udcfe", "value": "v", "traceback": "t\ud800"},
        }
    )
    assert cell is not None and cell.exception is not None
    assert cell.results[0].data == {"text/html": "<b>\\xff</b>", "application/json": {"k\\ud800": ["\\x80"]}}
    assert (cell.exception.name, cell.exception.traceback) == ("E\\xfe", "t\\ud800")
    result = a_result(cell)
    result.to_json().encode("utf-8")  # nothing left that UTF-8 cannot carry


def test_utf8_text() -> None:
    assert utf8_text("plain") == "plain" and utf8_text("café ☕") == "café ☕"
    assert utf8_text("a\udcffb") == "a\\xffb"  # a name read with surrogateescape: its byte
    assert utf8_text("\ud800\udcff") == "\\ud800\\udcff"  # not from bytes: the code points
    # An error's message may quote what an isolate said: what either door sends of it encodes.
    assert public_message(PathNotFoundError("no /work/\udcff")) == "no /work/\\xff"


def test_json_past_the_cells_values_is_not_said() -> None:
    # A subverted agent's account of a cell: copied value by value, each costing the host ~100 bytes.
    at_limit = read_cell(said([{}] * (MAX_CELL_VALUES - 1)))  # the list and its dicts
    assert at_limit is not None and len(at_limit.results[0].data["application/json"]) == MAX_CELL_VALUES - 1
    cell = read_cell(said([{}] * MAX_CELL_VALUES))
    assert cell is not None and cell.results[0].data == {"text/plain": "v"}  # its text kept
    # The budget is the cell's: a second result's JSON past what the first left is left out, its
    # text kept, and nothing is spent on a value refused.
    half = {"kind": "display_data", "data": {"text/plain": "h", "application/json": [0] * (MAX_CELL_VALUES // 2)}}
    three = read_cell({"execution_count": 1, "outputs": [half, half, half], "exception": None})
    assert three is not None and [sorted(r.data) for r in three.results] == [
        ["application/json", "text/plain"], ["text/plain"], ["text/plain"]
    ]  # fmt: skip


def test_an_image_that_is_no_base64_text_is_left_out_and_its_text_stays() -> None:
    # A _repr_png_ (or a forged account) of anything passed as it was: .png raised binascii.Error,
    # and mcp serve's image content for a JSON value was no image.
    good = "iVBORw0KGgo="
    for bad in ("not base64!", {"a": 1}, ["x"], "é"):
        data = {"text/plain": "<Figure>", "image/png": bad, "image/jpeg": good}
        cell = read_cell({"execution_count": 1, "outputs": [{"kind": "display_data", "data": data}], "exception": None})
        assert cell is not None and cell.results[0].data == {"text/plain": "<Figure>", "image/jpeg": good}, bad
        assert cell.results[0].png is None


def test_an_image_in_base64_with_line_breaks_is_kept_without_them() -> None:
    # base64.encodebytes writes a line break every 76 characters; IPython takes a _repr_png_ so written.
    import base64

    written = base64.encodebytes(bytes(range(256))).decode()
    data = {"text/plain": "<Figure>", "image/png": written}
    cell = read_cell({"execution_count": 1, "outputs": [{"kind": "display_data", "data": data}], "exception": None})
    assert cell is not None and cell.results[0].png == bytes(range(256))
    assert "\n" not in cell.results[0].data["image/png"]
