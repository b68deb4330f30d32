"""The wheel holds every module of every mapped folder (setuptools silently drops unlisted subpackages)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("longred-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in mapping.items():
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in source.parts:
                expected.add(package.replace(".", "/") + "/" + source.relative_to(ROOT / folder).as_posix())
    assert expected, "no modules found: is the package-dir mapping read correctly?"
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert "longred/storage/FORMAT.md" in names
    assert not any(n.split("/")[0] in {"storage", "train", "precompute", "eval"} for n in names)
