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
        # The rest of Unicode's default-ignorables: a pair of them spells bits as well as U+2062/U+2064 do.
        ("0\u206a1\u206b", "0\\u206a1\\u206b"),
        ("m\u180b\u180d\u180f\U0001bca0\U0001d173", "m\\u180b\\u180d\\u180f\\U0001bca0\\U0001d173"),
        ("t\U000e0080\U000e01f0\U000e0fff\ufff0", "t\\U000e0080\\U000e01f0\\U000e0fff\\ufff0"),
        ("tab\tand\nlines", "tab\tand\nlines"),  # kept
        ("plain é 中", "plain é 中"),
    ],
)
def test_what_would_act_or_hide_is_written_out(given: str, shown: str) -> None:
    assert without_controls(given) == shown
    assert printable(given) == shown.replace("\n", "\n    ")  # and no line passes for one of stockade's own


def test_every_format_character_is_written_out() -> None:
    # A hand-kept list missed U+206A-206F and the Mongolian selectors: every character of the
    # format category (Cf) that can stand alone is written out, whatever Unicode adds to it.
    import sys
    import unicodedata

    kept = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    # Prepended concatenation marks: signs drawn over the digits after them, visible.
    kept -= {chr(c) for c in [*range(0x0600, 0x0606), 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x110BD, 0x110CD]}
    kept -= {chr(c) for c in range(0x13430, 0x13460)}  # Egyptian hieroglyph format controls: they join signs
    shown = {c for c in kept if without_controls(c) == c}
    assert not shown, sorted(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in shown)
