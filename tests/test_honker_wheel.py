"""Tests for scripts/honker_wheel.py, which repairs honker's manylinux_2_38 wheel.

The repair tests use the real wheel from PyPI (pip's cache keeps reruns fast) and
run only where the repair is needed: a glibc Linux older than 2.38.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "honker_wheel.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("honker_wheel", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hw = _load_script()
HOST = hw.host_glibc()
needs_repair = pytest.mark.skipif(
    HOST is None or HOST >= (2, 38),
    reason=f"host glibc is {'.'.join(map(str, HOST or ())) or 'absent'}: "
    "honker's manylinux_2_38 wheel installs as it is, nothing to repair",
)


def run_script(dest: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(dest)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


# --- no-op on new or non-glibc hosts -------------------------------------------------


@pytest.mark.parametrize("glibc", ["2.38", "2.39", "none"])
def test_noop_when_host_needs_no_repair(tmp_path: Path, glibc: str) -> None:
    dest = tmp_path / "wheels"
    result = run_script(dest, HONKER_WHEEL_GLIBC=glibc)
    assert result.returncode == 0, result.stderr
    assert "no repair" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert not dest.exists()


def test_version_parsing() -> None:
    assert hw.parse_version("2.36") == (2, 36)
    assert hw.parse_version("2.3.4") == (2, 3)
    assert hw.parse_version("2") == (2, 0)
    assert hw.parse_version("none") is None
    assert hw.parse_version(None) is None
    assert hw.too_new("GLIBC_2.38", (2, 36))
    assert not hw.too_new("GLIBC_2.34", (2, 36))
    assert not hw.too_new("GLIBC_PRIVATE", (2, 36))
    assert not hw.too_new("GCC_4.2.0", (2, 36))


# --- the real wheel --------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """honker's wheel as PyPI ships it (the script downloads the same way)."""
    folder = tmp_path_factory.mktemp("original")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    pip += ["--platform", f"manylinux_2_38_{platform.machine()}", "-d", str(folder)]
    subprocess.run([*pip, "honker>=0.5"], check=True)
    return next(folder.glob("honker-*.whl"))


@pytest.fixture(scope="module")
def repaired_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("wheels")
    result = run_script(dest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("honker_wheel: wrote "), result.stdout
    return dest


def _sqlite_lib(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = (n for n in zf.namelist() if "/libsqlite3" in n)
        return zf.read(name)


@needs_repair
def test_weaken_sets_only_the_glibc_2_38_flag(original_wheel: Path) -> None:
    data = bytearray(_sqlite_lib(original_wheel))
    before = {name: (flags, syms) for _, name, flags, syms in hw.verneeds(data)}
    assert before["GLIBC_2.38"] == (0, ["fmod"])  # the one requirement the repair is for
    assert any("GLIBC_2.38" in p for p in hw.problems(data, (2, 36)))

    original = bytes(data)
    assert hw.weaken(data, "GLIBC_2.38") == 1
    after = {name: (flags, syms) for _, name, flags, syms in hw.verneeds(data)}
    assert after["GLIBC_2.38"] == (hw.VER_FLG_WEAK, ["fmod"])
    assert {k: v for k, v in after.items() if k != "GLIBC_2.38"} == {
        k: v for k, v in before.items() if k != "GLIBC_2.38"
    }
    changed = [i for i, (a, b) in enumerate(zip(original, data, strict=True)) if a != b]
    assert len(changed) == 1  # one byte of one vna_flags field
    # Weak, but fmod is still bound to it: the repair must also unbind the symbol.
    (problem,) = hw.problems(data, (2, 36))
    assert "GLIBC_2.38 (weak" in problem and "fmod" in problem


@needs_repair
def test_repaired_wheel_is_retagged_with_a_valid_record(repaired_dir: Path) -> None:
    (wheel,) = repaired_dir.glob("honker-*.whl")
    assert wheel.name.endswith(f"-manylinux_2_34_{platform.machine()}.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    meta = files[next(n for n in files if n.endswith(".dist-info/WHEEL"))].decode()
    tags = [line for line in meta.splitlines() if line.startswith("Tag:")]
    assert tags and all(t.endswith(f"-manylinux_2_34_{platform.machine()}") for t in tags), tags
    record = files[next(n for n in files if n.endswith("/RECORD"))].decode().splitlines()
    assert {line.split(",")[0] for line in record} == set(files)
    for line in record:
        name, digest, size = line.split(",")
        if name.endswith("/RECORD"):
            assert (digest, size) == ("", "")
            continue
        sha = base64.urlsafe_b64encode(hashlib.sha256(files[name]).digest()).rstrip(b"=")
        assert (digest, int(size)) == (f"sha256={sha.decode()}", len(files[name])), name
    for name, data in files.items():
        if data.startswith(b"\x7fELF"):
            assert hw.problems(data, (2, 34)) == [], name
    lib = _sqlite_lib(wheel)
    assert {name: (f, s) for _, name, f, s in hw.verneeds(lib)}["GLIBC_2.38"] == (2, [])


@needs_repair
def test_second_run_is_a_no_op(repaired_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in repaired_dir.iterdir()}
    result = run_script(repaired_dir)
    assert result.returncode == 0, result.stderr
    assert "already there" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in repaired_dir.iterdir()} == before


PROBE = """
import asyncio, sys, honker

async def main() -> None:
    db = honker.open(sys.argv[1])
    listener = db.listen("c", fallback_poll_s=None)
    with db.transaction() as tx:
        tx.notify("c", {"a": 1})
    rows = db.query("SELECT channel, payload FROM _honker_notifications")
    assert rows == [{"channel": "c", "payload": '{"a": 1}'}], rows
    note = await asyncio.wait_for(listener.__anext__(), 10)
    assert (note.channel, note.payload) == ("c", {"a": 1}), note
    # SQL mod() calls fmod() inside the patched libsqlite3.
    assert db.query("SELECT mod(7.5, 2) AS r") == [{"r": 1.5}]
    db.close()
    print("honker ok")

asyncio.run(main())
"""


@needs_repair
def test_repaired_wheel_installs_and_works(repaired_dir: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run([*pip, "--find-links", str(repaired_dir), "honker>=0.5"], check=True)
    site = subprocess.run(
        [str(python), "-c", "import honker, pathlib; print(pathlib.Path(honker.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (wheel_meta,) = Path(site).parent.glob("honker-*.dist-info/WHEEL")
    assert f"manylinux_2_34_{platform.machine()}" in wheel_meta.read_text()  # ours, not the sdist
    result = subprocess.run(
        [str(python), "-c", PROBE, str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "honker ok"
