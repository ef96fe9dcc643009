"""What a cell shows, in the interpreter: its results as MIME bundles, and the reply that carries
them, bounded (agent/kernel.py runs the cells; the host reads the reply with runtimes/cells.py).

A result is IPython's display protocol's bundle (``_repr_html_``, ``_repr_png_``,
...); the reply holds at most MAX_CELL_RESULTS of them, REPLY_MAX bytes and
MAX_REPLY_VALUES JSON values, the value of the cell's last expression kept
first, and a note of those left out.
"""

from __future__ import annotations

import sys

from . import jsoncodec, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The most one cell's reply (its display data) may hold: it travels in one agent frame.
REPLY_MAX = 6 << 20
# A repr longer than this is cut (an accidental huge value must not fill the reply).
TEXT_MAX = 64 << 10
# Levels a JSON display value may nest, and values it may hold: the host takes no deeper or larger
# one (runtimes/cells.py reads these). Decoded, each value costs the host ~100 bytes: six
# MiB of "[{},{},...]" was ~300 MB of the daemon's memory and a second of its loop, every cell.
MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 100_000
MAX_REPLY_VALUES = 2 * MAX_JSON_VALUES  # in one cell's JSON results, all told: past it, results are left out
MAX_CELL_RESULTS = 1000  # result.MAX_CELL_RESULTS (the agent imports nothing of the host's)
MAX_MIME_TYPES = 31  # result.MAX_CELL_MIME_TYPES, less one: room for text/plain
_REPRS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)
_BINARY = ("image/png", "image/jpeg")


class Results:
    """What a cell shows: ``display()``'s and its figures (at most MAX_CELL_RESULTS - 2 of them: room
    for its value and the note of those left out), then its value."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.left_out = 0

    def clear(self) -> None:
        self.outputs, self.left_out = [], 0

    def display(self, *objs: Any) -> None:
        for obj in objs:
            if len(self.outputs) < MAX_CELL_RESULTS - 2:
                self.outputs.append(output("display_data", obj))
            else:
                self.left_out += 1  # not rendered: a loop of displays costs no more past the cap


def output(kind: str, obj: Any) -> dict[str, Any]:
    """``obj`` as a MIME bundle (IPython's display protocol), ``text/plain`` always."""
    data: dict[str, Any] = {}
    if not isinstance(obj, type):  # a class's _repr_html_ is an unbound function
        bundle = _call(getattr(obj, "_repr_mimebundle_", None), include=None, exclude=None)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        if isinstance(bundle, dict):
            for mime, value in bundle.items():
                if len(data) < MAX_MIME_TYPES:  # the host takes no more (result.MAX_CELL_MIME_TYPES)
                    _add(data, str(mime), value)
        for method, mime in _REPRS:
            if mime not in data and len(data) < MAX_MIME_TYPES:
                _add(data, mime, _call(getattr(obj, method, None)))
    if "text/plain" not in data:
        try:
            text = repr(obj)
        except Exception as exc:  # noqa: BLE001
            text = f"<repr failed: {type(exc).__name__}: {exc}>"
        data["text/plain"] = text if len(text) <= TEXT_MAX else text[:TEXT_MAX] + "…"
    return {"kind": kind, "data": data}


def _call(method: Any, **kwargs: Any) -> Any:
    if not callable(method):
        return None
    try:
        return method(**kwargs)
    except Exception:  # noqa: BLE001 - a broken _repr_*_ costs its format, not the cell
        return None


def _add(data: dict[str, Any], mime: str, value: Any) -> None:
    if isinstance(value, tuple) and len(value) == 2:
        value = value[0]  # (data, metadata)
    if value is None:
        return
    if mime in _BINARY:
        if isinstance(value, (bytes, bytearray)):
            data[mime] = wire.b64encode(bytes(value))
        elif isinstance(value, str):
            data[mime] = value  # already base64, as IPython allows
    elif mime == "application/json":
        if json_values(value, MAX_JSON_DEPTH, MAX_JSON_VALUES) is None:
            return  # the host would not take it (runtimes/cells.py)
        try:
            jsoncodec.dumps(value)
        except (TypeError, ValueError, RecursionError):
            return
        data[mime] = value
    elif isinstance(value, str):
        data[mime] = value


def json_values(value: Any, depth_limit: int, most: int) -> int | None:
    """The values ``value`` holds (keys counted), if it nests lists, tuples (JSON arrays too) and
    dicts at most ``depth_limit`` levels deep and holds at most ``most``; else None (walked without
    recursion). The host counts a cell's results with this too (runtimes/cells.py)."""
    stack, seen = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if isinstance(item, (list, tuple, dict)):
            if depth > depth_limit:
                return None
            if isinstance(item, dict):
                seen += len(item)
                stack.extend((inner, depth + 1) for inner in item.values())
            else:
                stack.extend((inner, depth + 1) for inner in item)
        if seen > most:
            return None
    return seen


def figures(room: int, results: Results) -> list[dict[str, Any]]:
    """The matplotlib figures the cell shown or left open, as PNG, ``room`` at most (the others
    counted as left out); then closed (as IPython's inline backend)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    import io

    shown: list[dict[str, Any]] = []
    try:
        for number in plt.get_fignums():
            if len(shown) >= room:
                results.left_out += 1
                continue
            figure = plt.figure(number)
            png = io.BytesIO()
            figure.savefig(png, format="png", bbox_inches="tight")
            data = {"image/png": wire.b64encode(png.getvalue()), "text/plain": repr(figure)}
            shown.append({"kind": "display_data", "data": data})
    except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is said, not fatal
        print(f"stockade: a figure could not be drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        plt.close("all")
    return shown


def bounded_frame(reply: dict[str, Any], results: Results) -> bytes:
    """The cell's reply framed, with as many of its results as its bounds take."""
    payload = jsoncodec.dumps(within(reply, results.outputs, REPLY_MAX, results.left_out)).encode()
    if len(payload) > REPLY_MAX:  # not so (``fitted`` counts each result's bytes), but the frame must stay within
        payload = jsoncodec.dumps({**reply, "outputs": [], "exception": None}).encode()
    return wire.encode_frame(payload)


def within(reply: dict[str, Any], outputs: list[Any], room: int, left_out: int = 0, why: str = "") -> dict[str, Any]:
    """``reply`` with as many of ``outputs`` as keep its JSON within ``room`` bytes (``fitted``); with
    none, and no exception, when what else it holds does not fit already."""
    rest = len(jsoncodec.dumps({**reply, "outputs": []}))
    if rest > room:
        return {**reply, "outputs": [], "exception": None}
    return {**reply, "outputs": fitted(outputs, room - rest, left_out, why)}


# Bytes kept for the note of results left out.
_NOTE_ROOM = 300


def fitted(outputs: list[Any], room: int, left_out: int = 0, why: str = "") -> list[Any]:
    """As many of a cell's ``outputs`` as fit ``room`` bytes of JSON and the values one cell's
    results may hold (MAX_REPLY_VALUES), the value (``execute_result``) first, the others in their
    order, then a note of how many were left out (``left_out`` of them before). Linear: each
    is measured once (a reply cut one result at a time was measured once a result, 50,000
    displays a minute). ``why``: the note's reason, when it is not the cell's own bounds."""
    bytes_left, values_left = room - _NOTE_ROOM, MAX_REPLY_VALUES
    first = [i for i, o in enumerate(outputs) if isinstance(o, dict) and o.get("kind") == "execute_result"]
    rest = set(range(len(outputs))).difference(first)
    kept: set[int] = set()
    for i in [*first, *sorted(rest)]:
        size = len(jsoncodec.dumps(outputs[i])) + 1  # with its comma
        values = _json_values_of(outputs[i])
        if size > bytes_left or values is None or values > values_left or len(kept) >= MAX_CELL_RESULTS - 1:
            left_out += 1
            continue
        kept.add(i)
        bytes_left, values_left = bytes_left - size, values_left - values
    shown = [outputs[i] for i in sorted(kept)]
    if left_out:
        why = why or (f"a cell's results are limited to {MAX_CELL_RESULTS}, {REPLY_MAX} bytes and "
                      f"{MAX_REPLY_VALUES} JSON values")  # fmt: skip
        note = f"[{left_out} result(s) left out: {why}]"
        shown.append({"kind": "display_data", "data": {"text/plain": note}})
    return shown


def _json_values_of(output: Any) -> int | None:
    """The JSON values of one result's non-text formats (as ``reply_within`` counts them), or None."""
    data = output.get("data") if isinstance(output, dict) else None
    values = [v for v in data.values() if not isinstance(v, str)] if isinstance(data, dict) else [output]
    found = json_values(values, MAX_JSON_DEPTH + 1, MAX_REPLY_VALUES + 1)
    return None if found is None else found - 1


def reply_within(reply: dict[str, Any]) -> bool:
    """Whether a cell's JSON results hold no more values, in all, than the host takes of one cell's
    (runtimes/cells.py), and its reply nests no deeper than theirs may."""
    outputs = reply.get("outputs")
    values = [v for o in outputs if isinstance(o, dict) and isinstance(o.get("data"), dict)
              for v in o["data"].values() if not isinstance(v, str)] if isinstance(outputs, list) else []  # fmt: skip
    return (
        json_values(values, MAX_JSON_DEPTH + 1, MAX_REPLY_VALUES + 1) is not None
        and json_values(reply, MAX_JSON_DEPTH + 4, MAX_REPLY_VALUES + 100 * MAX_CELL_RESULTS) is not None
    )
