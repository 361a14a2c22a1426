#!/usr/bin/env python3
"""Make honker's manylinux_2_38 wheel installable on glibc 2.34-2.37.

honker >= 0.5 ships only ``manylinux_2_38`` wheels, so pip on e.g. Debian 12
(glibc 2.36) silently falls back to an old sdist that needs Rust. The only
symbol above glibc 2.34 in the wheel is ``fmod@GLIBC_2.38`` in the bundled
libsqlite3; libm has exported ``fmod`` since glibc 2.2.5. This script downloads
the wheel, marks that version requirement weak, unbinds ``fmod`` from it with
patchelf, retags the wheel ``manylinux_2_34`` and writes it to ``--dest``, for
``pip install --find-links DEST 'honker>=0.5'``.

Usage: python scripts/honker_wheel.py --dest DIR [--python PY]
(For tests, the env var HONKER_WHEEL_GLIBC=2.39 or =none overrides the host glibc.)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_GLIBC = (2, 38)  # what honker's wheels are tagged with
NEW_GLIBC = (2, 34)  # what they really need once repaired
SAFE_SYMBOLS = {"GLIBC_2.38": {"fmod"}}  # symbols an older libc also provides
VER_FLG_WEAK = 0x2
SHT_GNU_VERNEED, SHT_GNU_VERSYM = 0x6FFFFFFE, 0x6FFFFFFF

Version = tuple[int, int]


def parse_version(text: str | None) -> Version | None:
    """(2, 36) for "2.36" or "2.36.1"; None for anything else ("none", "PRIVATE")."""
    try:
        major, minor = [*(text or "").split("."), "0"][:2]
        return int(major), int(minor)
    except ValueError:
        return None


def host_glibc() -> Version | None:
    """The running glibc as (major, minor), or None if this is not glibc Linux."""
    text = os.environ.get("HONKER_WHEEL_GLIBC")  # hidden override for tests
    if text is None and sys.platform.startswith("linux"):
        try:  # "glibc 2.36"
            text = (os.confstr("CS_GNU_LIBC_VERSION") or "").removeprefix("glibc ")
        except (ValueError, OSError):
            lib, text = platform.libc_ver()
            text = text if lib == "glibc" else None
    return parse_version(text)


def too_new(name: str, host: Version) -> bool:
    """Whether version name `name` (e.g. "GLIBC_2.38") is a glibc newer than `host`."""
    version = parse_version(name[6:]) if name.startswith("GLIBC_") else None
    return version is not None and version > host


def _cstr(data: bytes | bytearray, off: int) -> str:
    return data[off : data.index(b"\0", off)].decode()


def verneeds(data: bytes | bytearray) -> list[tuple[int, str, int, list[str]]]:
    """Every Vernaux entry of a 64-bit little-endian ELF as
    (offset of its vna_flags, version name, flags, names of symbols bound to it)."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # Section header: name, type, flags, addr, offset, size, link, info, ...
    secs = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    need_by_index: dict[int, tuple[int, str, int, list[str]]] = {}
    for sec in (s for s in secs if s[1] == SHT_GNU_VERNEED):  # .gnu.version_r
        strtab = secs[sec[6]][4]  # sh_link -> .dynstr
        off, count = sec[4], sec[7]  # sh_info = number of Verneed entries
        for _ in range(count):
            _, vn_cnt, _, vn_aux, vn_next = struct.unpack_from("<HHIII", data, off)
            aux = off + vn_aux
            for _ in range(vn_cnt):
                _, flags, other, name, vna_next = struct.unpack_from("<IHHII", data, aux)
                need_by_index[other] = (aux + 4, _cstr(data, strtab + name), flags, [])
                aux += vna_next
            off += vn_next
    for sec in (s for s in secs if s[1] == SHT_GNU_VERSYM):  # .gnu.version
        dynsym = secs[sec[6]]  # parallel to .dynsym: one uint16 per symbol
        for i in range(sec[5] // 2):
            index = struct.unpack_from("<H", data, sec[4] + 2 * i)[0] & 0x7FFF
            if index in need_by_index:
                st_name = struct.unpack_from("<I", data, dynsym[4] + 24 * i)[0]
                need_by_index[index][3].append(_cstr(data, secs[dynsym[6]][4] + st_name))
    return list(need_by_index.values())


def weaken(data: bytearray, version: str) -> int:
    """Set VER_FLG_WEAK on every requirement of `version`; return how many."""
    hits = [off for off, name, _, _ in verneeds(data) if name == version]
    for off in hits:
        struct.pack_into("<H", data, off, struct.unpack_from("<H", data, off)[0] | VER_FLG_WEAK)
    return len(hits)


def problems(data: bytes | bytearray, host: Version) -> list[str]:
    """Requirements that would stop this ELF from loading on glibc `host`."""
    out = []
    for _, name, flags, syms in verneeds(data):
        if too_new(name, host) and (not flags & VER_FLG_WEAK or syms):
            out.append(f"{name} ({'weak, ' if flags & VER_FLG_WEAK else ''}symbols {syms})")
    return out


def patchelf() -> str:
    """Path of patchelf; pip-installs it into the running interpreter if missing."""
    local = Path(sys.executable).parent / "patchelf"
    found = str(local) if local.exists() else shutil.which("patchelf")
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "patchelf"], check=True)
        found = str(local) if local.exists() else shutil.which("patchelf")
    if not found:
        sys.exit("honker_wheel: patchelf not found even after pip install patchelf")
    return found


def repair(data: bytes, host: Version, tmp: Path) -> bytes:
    """Return the ELF `data` with its too-new but safe requirements relaxed."""
    for _, name, _, syms in verneeds(data):
        if not too_new(name, host) or not set(syms) <= SAFE_SYMBOLS.get(name, set()):
            continue  # fine already, or unknown territory: left for problems() to report
        lib = tmp / "lib.so"
        lib.write_bytes(data)
        for sym in syms:  # bind to the base version: libm's default fmod@@GLIBC_2.2.5
            subprocess.run([patchelf(), "--clear-symbol-version", sym, str(lib)], check=True)
        patched = bytearray(lib.read_bytes())
        weaken(patched, name)  # a missing weak version is only a warning for ld.so
        data = bytes(patched)
    return data


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def retag(src: Path, dest_dir: Path, host: Version, tmp: Path) -> Path:
    """Write a repaired, retagged copy of wheel `src` into `dest_dir`."""
    old_plat = src.stem.rsplit("-", 1)[1]  # e.g. manylinux_2_38_x86_64
    new_plat = f"manylinux_{NEW_GLIBC[0]}_{NEW_GLIBC[1]}_{platform.machine()}"
    out = dest_dir / src.name.replace(old_plat, new_plat)
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info)) for info in zin.infolist()]
    fixed, record, errors = [], members[-1][0], []
    for info, data in members:
        if data.startswith(b"\x7fELF"):
            data = repair(data, host, tmp)
            errors += [f"{info.filename}: {p}" for p in problems(data, host)]
        elif info.filename.endswith(".dist-info/WHEEL"):
            data = data.replace(old_plat.encode(), new_plat.encode())
        elif info.filename.endswith(".dist-info/RECORD"):
            record = info
            continue
        fixed.append((info, data))
    if errors:
        sys.exit("honker_wheel: still too new for this glibc:\n  " + "\n  ".join(errors))
    lines = "".join(record_line(i.filename, data) for i, data in fixed) + f"{record.filename},,\n"
    part = out.with_suffix(".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in [*fixed, (record, lines.encode())]:  # RECORD goes last
            fresh = zipfile.ZipInfo(info.filename, info.date_time)  # keeps name, time, mode
            fresh.external_attr, fresh.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            zout.writestr(fresh, data)
    part.replace(out)  # atomic: a half-written wheel never sits in dest_dir
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True, help="folder for the wheel")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose pip downloads")
    args = parser.parse_args(argv)
    host = host_glibc()
    if host is None or host >= WHEEL_GLIBC:
        found = "not glibc" if host is None else f"glibc {host[0]}.{host[1]}"
        print(f"honker_wheel: host is {found}, honker's wheels install as they are: no repair")
        return 0
    arch = platform.machine()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pip = [args.python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        pip += ["--platform", f"manylinux_2_38_{arch}", "-d", str(tmp), "honker>=0.5"]
        subprocess.run(pip, check=True)
        src = next(tmp.glob("honker-*.whl"))
        version = src.name.split("-")[1]
        tagged = parse_version(".".join(src.stem.rsplit("-", 1)[1].split("_")[1:3]))
        args.dest.mkdir(parents=True, exist_ok=True)
        done = list(args.dest.glob(f"honker-{version}-*-manylinux_2_34_{arch}.whl"))
        if done:
            print(f"honker_wheel: {done[0]} already there")
        elif tagged is not None and tagged <= host:  # a newer honker that needs no repair
            shutil.copy2(src, args.dest)
            print(f"honker_wheel: {src.name} needs no repair, copied to {args.dest}")
        else:
            print(f"honker_wheel: wrote {retag(src, args.dest, host, tmp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
