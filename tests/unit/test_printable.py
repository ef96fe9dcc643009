"""Text from an isolate shown where a terminal or a person reads it: nothing in it acts or hides."""

from __future__ import annotations

import pytest

from stockade.errors import printable, without_controls


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # C0: a terminal acts on it
        ("a\x9bb\x7f", "a\\x9bb\\x7f"),  # C1 and DEL
        ("x\u202ey\u2066", "x\\u202ey\\u2066"),  # reordering marks
        ("a\u200bb\ufeff", "a\\u200bb\\ufeff"),  # zero-width
        ("a\u00adb\u2062c\u061c\u180e\ufff9", "a\\xadb\\u2062c\\u061c\\u180e\\ufff9"),  # invisible
        ("say \U000e0068\U000e0069", "say \\U000e0068\\U000e0069"),  # tag characters: text a person does not see
        ("v\ufe0f\U000e0100\u3164\u115f\u034f", "v\\ufe0f\\U000e0100\\u3164\\u115f\\u034f"),  # selectors, fillers
        ("ok\u2028stockade: forged\u2029", "ok\\u2028stockade: forged\\u2029"),  # lines, to some viewers
        ("tab\tand\nlines", "tab\tand\nlines"),  # kept
        ("plain é 中", "plain é 中"),
    ],
)
def test_what_would_act_or_hide_is_written_out(given: str, shown: str) -> None:
    assert without_controls(given) == shown
    assert printable(given) == shown.replace("\n", "\n    ")  # and no line passes for one of stockade's own
