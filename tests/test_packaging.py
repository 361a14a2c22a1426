"""The wheel is one import package, ``alkpubsub``, and works installed.

The code folders (core/, transports/, ...) become ``alkpubsub.*`` through
``[tool.setuptools.package-dir]``. An editable install hides mistakes there
(the import hook maps folders itself), so this builds a real wheel, installs it
into a fresh virtualenv and imports it from outside the source tree.

The build runs on a copy of pyproject.toml and the code folders in a temporary
directory: setuptools writes ``build/`` and ``*.egg-info`` next to the sources,
and a stale ``build/lib`` could otherwise smuggle deleted modules into the wheel.
Dependencies are not installed again: the fresh venv sees this environment's
site-packages through a ``.pth`` line (a plain path: the editable install's
own ``.pth`` hook in there is not run, so the source tree stays unimportable).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the project's .venv python when run as documented

REQUIRED_FILES = [
    "alkpubsub/__init__.py",
    "alkpubsub/py.typed",
    "alkpubsub/transports/__init__.py",
    "alkpubsub/transports/inprocess.py",
    "alkpubsub/storage/__init__.py",
    "alkpubsub/conformance/__init__.py",
    "alkpubsub/composite/__init__.py",
]
SUBPACKAGES = [
    "alkpubsub",
    "alkpubsub.transports",
    "alkpubsub.transports.inprocess",
    "alkpubsub.storage",
    "alkpubsub.conformance",
    "alkpubsub.composite",
]
CODE_FOLDERS = ["core", "transports", "storage", "conformance", "composite"]
SCHEMES = ["memory", "honker", "honker+durable", "redis", "redis+durable", "nats", "nats+durable"]


def _env() -> dict[str, str]:
    """The environment for child processes, without anything that adds import paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, README and every folder named in package-dir, without caches."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = pyproject["tool"]["setuptools"]["package-dir"].values()
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", "*.db-*", ".mypy_cache")
    for folder in folders:
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)


def _build_wheel(src: Path, out: Path) -> Path:
    """Build with this environment's setuptools (``--no-isolation``); if it does not
    meet pyproject's build requirements, fall back to an isolated build, loudly."""
    base = [PYTHON, "-m", "build", "--wheel", "--outdir", str(out)]
    done = _run([*base, "--no-isolation", str(src)], cwd=src)
    output = done.stdout + done.stderr
    if done.returncode != 0 and "Unmet dependencies" in output:
        unmet = output[output.index("Unmet dependencies") :]
        warnings.warn(
            f"`python -m build --no-isolation` refused: {unmet.strip()}\n"
            "built in an isolated environment instead (needs the package index); "
            "add pyproject's build requirements to the [dev] extra to build offline",
            stacklevel=2,
        )
        done = _run([*base, str(src)], cwd=src)
    assert done.returncode == 0, f"wheel build failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    (wheel,) = out.glob("alkpubsub-*.whl")
    return wheel


@dataclass
class Installed:
    wheel: Path
    names: list[str]
    venv: Path
    python: Path
    site_packages: Path
    workdir: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built once, and a fresh venv it is installed in."""
    tmp = tmp_path_factory.mktemp("packaging")
    _copy_sources(tmp / "src")
    wheel = _build_wheel(tmp / "src", tmp / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()

    venv = tmp / "venv"
    made = _run([PYTHON, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp
    )
    site_packages = Path(purelib.stdout.strip())
    assert site_packages.is_relative_to(venv), purelib
    # Dependencies (honker, pydantic, redis, nats, pytest) from this environment.
    (site_packages / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --target, not --prefix: with --prefix, pip first uninstalls the alkpubsub it
    # finds in the environment running it, i.e. this project's editable install.
    ours = sorted(Path(sysconfig.get_paths()["purelib"]).glob("alkpubsub-*.dist-info"))
    install = _run(
        [
            PYTHON,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-warn-script-location",
            "--target",
            str(site_packages),
            str(wheel),
        ],
        cwd=tmp,
    )
    assert install.returncode == 0, f"{install.stdout}\n{install.stderr}"
    assert sorted(Path(sysconfig.get_paths()["purelib"]).glob("alkpubsub-*.dist-info")) == ours
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return Installed(wheel, names, venv, python, site_packages, workdir)


def test_wheel_contains_every_subpackage_and_py_typed(installed: Installed) -> None:
    missing = [name for name in REQUIRED_FILES if name not in installed.names]
    assert missing == [], f"{installed.wheel.name} lacks {missing}; it has {installed.names}"


def test_wheel_installs_no_top_level_code_folders(installed: Installed) -> None:
    tops = {name.split("/", 1)[0] for name in installed.names}
    assert tops & set(CODE_FOLDERS) == set()
    # Only the package and its metadata.
    assert {t for t in tops if not t.endswith(".dist-info")} == {"alkpubsub"}


def test_wheel_declares_console_script_and_transport_entry_points(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(name).decode()
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep case
    parser.read_string(text)
    assert parser["console_scripts"]["alkpubsub"].strip() == "alkpubsub.cli:main"
    transports = {k: v.strip() for k, v in parser["alkpubsub.transports"].items()}
    for scheme in SCHEMES:
        assert transports[scheme].endswith(":from_url"), scheme
        assert transports[scheme].startswith("alkpubsub.transports."), scheme
    assert transports["memory"] == "alkpubsub.transports.inprocess:from_url"


def test_installed_wheel_imports_from_fresh_venv_outside_source_tree(
    installed: Installed,
) -> None:
    probe = textwrap.dedent(
        f"""
        import asyncio, importlib, importlib.util, json, sys
        from importlib.metadata import entry_points

        files = {{name: importlib.import_module(name).__file__ for name in {SUBPACKAGES!r}}}
        tops = {{name: importlib.util.find_spec(name) is not None for name in {CODE_FOLDERS!r}}}
        (script,) = entry_points(group="console_scripts", name="alkpubsub")
        script_target = script.value
        script_callable = callable(script.load())

        import alkpubsub

        async def round_trip():
            transport = await alkpubsub.connect("memory://")
            async with transport, transport.subscribe("a:*") as sub:
                await transport.publish("a:b", {{"ok": True}})
                return (await sub.get(timeout=1)).payload

        print(json.dumps({{
            "files": files,
            "tops": tops,
            "script_target": script_target,
            "script_callable": script_callable,
            "payload": asyncio.run(round_trip()),
            "prefix": sys.prefix,
        }}))
        """
    )
    done = _run([str(installed.python), "-c", probe], cwd=installed.workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(report["prefix"]).resolve() == installed.venv.resolve()
    package_dir = (installed.site_packages / "alkpubsub").resolve()
    for name, file in report["files"].items():
        assert file is not None, f"{name} imported as a namespace package: no __init__.py"
        assert Path(file).resolve().is_relative_to(package_dir), (name, file)
    assert Path(report["files"]["alkpubsub"]).resolve() == package_dir / "__init__.py"
    assert not any(report["tops"].values()), report["tops"]  # no `core`, `storage`, ...
    assert report["script_target"] == "alkpubsub.cli:main"
    assert report["script_callable"] is True
    assert (installed.site_packages / "bin" / "alkpubsub").is_file()  # --target puts it there
    assert report["payload"] == {"ok": True}
