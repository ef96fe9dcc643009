"""scripts/ensure-deps.sh: the bookworm-backports entry comes from the host's own apt sources.

The script reads apt's sources under ``STOCKADE_APT_ETC`` (a temporary tree
here): one-line ``sources.list``/``*.list`` and deb822 ``*.sources``. The entry
it would add for bookworm-backports has the URIs and the trust (Signed-By,
Trusted) of the entry that serves bookworm main, so a host on a local mirror
keeps using it; a host that has backports already gets nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-deps.sh"
MIRROR = "http://apt-mirror.internal/debian"
KEYRING = "/usr/share/keyrings/local-mirror.gpg"


def _apt_etc(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def _show(etc: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "STOCKADE_APT_ETC": str(etc)}
    return subprocess.run(
        ["bash", str(SCRIPT), "--show-backports-source"], env=env, capture_output=True, text=True, timeout=30
    )


def _entry(uris: str, signed_by: str | None = KEYRING, trusted: str | None = None) -> str:
    lines = ["Types: deb", f"URIs: {uris}", "Suites: bookworm-backports", "Components: main"]
    if signed_by is not None:
        lines.append(f"Signed-By:{signed_by}" if signed_by.startswith("\n") else f"Signed-By: {signed_by}")
    if trusted is not None:
        lines.append(f"Trusted: {trusted}")
    return "\n".join(lines) + "\n"


DEB822_HOST = f"""Types: deb
# the host's own mirror
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main non-free-firmware
Signed-By: {KEYRING}

Types: deb
URIs: http://apt-mirror.internal/debian-security
Suites: bookworm-security
Components: main
Signed-By: {KEYRING}
"""


def test_deb822_sources_give_their_mirror_and_keyring(tmp_path: Path) -> None:
    shown = _show(_apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822_HOST}))
    assert (shown.returncode, shown.stdout) == (0, _entry(MIRROR))


def test_one_line_sources_give_their_mirror_and_keyring(tmp_path: Path) -> None:
    sources = (
        "# a local mirror\n"
        "deb-src http://apt-mirror.internal/debian-src bookworm main\n"
        "deb http://apt-mirror.internal/other bookworm-updates main\n"
        "deb http://apt-mirror.internal/contrib-only bookworm contrib\n"
        f"deb [ arch=amd64 signed-by={KEYRING} ] {MIRROR} bookworm main contrib  # the release\n"
    )
    shown = _show(_apt_etc(tmp_path, {"sources.list": sources}))
    assert (shown.returncode, shown.stdout) == (0, _entry(MIRROR))


def test_a_local_file_mirror_without_a_keyring_of_its_own(tmp_path: Path) -> None:
    # No signed-by: apt checks it against its default keyrings, and so will it the backports entry.
    sources = "deb [trusted=yes] file:/srv/mirror/debian bookworm main\n"
    shown = _show(_apt_etc(tmp_path, {"sources.list.d/local.list": sources}))
    assert (shown.returncode, shown.stdout) == (0, _entry("file:/srv/mirror/debian", None, "yes"))


def test_deb822_with_several_uris_and_an_embedded_key(tmp_path: Path) -> None:
    armored = ("-----BEGIN PGP PUBLIC KEY BLOCK-----", ".", "mQINBGPL0BUBEADmW5N", "-----END PGP PUBLIC KEY BLOCK-----")
    key = "".join("\n " + line for line in armored)  # continuation lines, " ." for an empty one
    sources = (
        "Types: deb\nURIs: http://unused.internal/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        f"Types: deb deb-src\nURIs: {MIRROR}\n http://10.0.0.5/debian\nSuites: bookworm\nComponents: main\n"
        f"Signed-By:{key}\n"
    )
    shown = _show(_apt_etc(tmp_path, {"sources.list.d/mirrors.sources": sources}))
    assert (shown.returncode, shown.stdout) == (0, _entry(f"{MIRROR} http://10.0.0.5/debian", key))


def test_the_first_entry_in_apts_reading_order_is_taken(tmp_path: Path) -> None:
    # apt reads sources.list first, then sources.list.d/ in name order.
    etc = _apt_etc(
        tmp_path,
        {
            "sources.list": "deb http://first.internal/debian bookworm main\n",
            "sources.list.d/debian.sources": DEB822_HOST,
        },
    )
    assert _show(etc).stdout == _entry("http://first.internal/debian", None)
    (etc / "sources.list").unlink()
    (etc / "sources.list.d" / "a.list").write_text("deb http://a.internal/debian bookworm main\n")
    (etc / "sources.list.d" / "z.list.disabled").write_text("deb http://z.internal/debian bookworm main\n")
    assert _show(etc).stdout == _entry("http://a.internal/debian", None)


@pytest.mark.parametrize(
    "configured",
    [
        ("sources.list", f"deb {MIRROR} bookworm-backports main\n"),
        ("sources.list.d/backports.sources", _entry(MIRROR)),
    ],
    ids=["one-line", "deb822"],
)
def test_a_host_with_backports_gets_nothing(tmp_path: Path, configured: tuple[str, str]) -> None:
    etc = _apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822_HOST, configured[0]: configured[1]})
    shown = _show(etc)
    assert (shown.returncode, shown.stdout) == (0, "")


@pytest.mark.parametrize(
    "not_configured",
    [
        ("sources.list", f"# deb {MIRROR} bookworm-backports main\n"),
        ("sources.list.d/backports.sources", _entry(MIRROR) + "Enabled: no\n"),
        ("sources.list.d/backports.list.save", f"deb {MIRROR} bookworm-backports main\n"),
    ],
    ids=["commented-out", "disabled", "not-a-source-file"],
)
def test_backports_that_apt_does_not_use_do_not_count(tmp_path: Path, not_configured: tuple[str, str]) -> None:
    etc = _apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822_HOST, not_configured[0]: not_configured[1]})
    assert _show(etc).stdout == _entry(MIRROR)


def test_no_source_for_bookworm_main_is_an_error_not_a_guess(tmp_path: Path) -> None:
    etc = _apt_etc(tmp_path, {"sources.list": "deb http://apt-mirror.internal/debian bookworm-security main\n"})
    shown = _show(etc)
    assert shown.returncode == 1 and shown.stdout == ""
    assert "no apt source" in shown.stderr and "bookworm main" in shown.stderr
    assert _show(_apt_etc(tmp_path / "empty", {})).returncode == 1


def _os_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip().strip('"')
    return ""


@pytest.mark.skipif(_os_codename() != "bookworm", reason="the script adds backports on Debian 12 (bookworm) only")
def test_the_script_writes_the_entry_once(tmp_path: Path) -> None:
    """The whole script, with dpkg and apt replaced by stand-ins that record their calls:
    runsc missing, everything else installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    stand_ins = {
        "dpkg-query": 'echo "dpkg-query $*" >> "$LOG"; case "$*" in *runsc*) exit 1 ;; esac; '
        'printf "install ok installed"',
        "dpkg": 'echo "dpkg $*" >> "$LOG"; exit 1',
        "apt-get": 'echo "apt-get $*" >> "$LOG"',
        "sudo": 'exec "$@"',
    }
    for name, body in stand_ins.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    etc = _apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822_HOST})
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STOCKADE_APT_ETC": str(etc), "LOG": str(log)}
    said = []
    for _ in range(2):  # the second run finds the entry the first one wrote
        done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        said.append("adding bookworm-backports" in done.stdout)
    assert said == [True, False]
    assert sorted(os.listdir(etc / "sources.list.d")) == ["debian.sources", "stockade-bookworm-backports.sources"]
    assert (etc / "sources.list.d" / "stockade-bookworm-backports.sources").read_text() == _entry(MIRROR)
    installs = [line for line in log.read_text().splitlines() if line.startswith("apt-get install")]
    assert installs == ["apt-get install -y -qq --no-install-recommends -t bookworm-backports runsc"] * 2
