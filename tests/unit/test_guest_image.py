"""The microVM guest image's cache: an image is used only while what it copied from the host is unchanged.

Files only: no image is built here (tests/conformance/test_microvm.py boots real ones).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest

from stockade.errors import SandboxStartError
from stockade.runtimes.microvm import image


def _image_dir(tmp_path: Path, host_files: dict[str, str] | None) -> str:
    directory = tmp_path / "image"
    directory.mkdir()
    (directory / "vmlinux").write_bytes(b"\x7fELF")
    (directory / "initramfs.cpio").write_bytes(b"070701")
    manifest: dict[str, object] = {"kernel_package": "linux-image-test", "kernel_version": "6.1.0-test", "key": "k"}
    if host_files is not None:
        manifest["host_files"] = host_files
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def test_an_image_is_stale_once_a_host_file_it_copied_changes(tmp_path: Path) -> None:
    library = tmp_path / "libpython-test.so"
    library.write_bytes(b"one build")
    link = tmp_path / "libpython.so"
    link.symlink_to(library.name)
    directory = _image_dir(tmp_path, {str(library): image._host_stamp(str(library)),
                                      str(link): image._host_stamp(str(link))})  # fmt: skip
    loaded = image._load(directory)
    assert loaded is not None and loaded.kernel_version == "6.1.0-test"

    library.write_bytes(b"an upgraded build")  # a package upgrade: new size and time
    assert image._load(directory) is None

    library.write_bytes(b"one build")
    os.utime(library, ns=(1, 1))  # same size, another time: still not the file that was copied
    assert image._load(directory) is None


def test_a_relinked_or_removed_host_file_makes_the_image_stale(tmp_path: Path) -> None:
    (tmp_path / "a.so").write_bytes(b"a")
    (tmp_path / "b.so").write_bytes(b"b")
    link = tmp_path / "lib.so"
    link.symlink_to("a.so")
    directory = _image_dir(tmp_path, {str(link): image._host_stamp(str(link))})
    assert image._load(directory) is not None
    link.unlink()
    link.symlink_to("b.so")
    assert image._load(directory) is None
    link.unlink()
    assert image._load(directory) is None


def test_an_image_that_kept_no_list_of_host_files_is_rebuilt(tmp_path: Path) -> None:
    assert image._load(_image_dir(tmp_path, None)) is None


def test_an_image_built_on_demand_says_so_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A first microVM start builds the image: a minute that must not look like a hang.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the build's work directory goes
    monkeypatch.setattr(image, "_kernel_package_name", lambda cached_only: "linux-image-test")

    def offline(package: str, into: str) -> str:
        raise SandboxStartError(f"apt-get download {package} failed: offline")

    monkeypatch.setattr(image, "_download", offline)
    with caplog.at_level(logging.WARNING, logger="stockade.microvm"), pytest.raises(SandboxStartError):
        image.build()
    assert "building the microVM guest image from linux-image-test" in caplog.text
    caplog.clear()
    with pytest.raises(SandboxStartError):
        image.build(progress=lambda step, fraction: None)  # `stockade image build` shows its own bar
    assert "building the microVM guest image" not in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("stockade-image-")]  # no work dir left
