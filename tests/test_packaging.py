"""The wheel holds every module and data file of src/longred (a folder without __init__.py is dropped)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


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
    expected = {
        source.relative_to(SRC).as_posix()
        for source in (SRC / "longred").rglob("*.py")
        if "__pycache__" not in source.parts
    }
    assert len(expected) > 40, "src/longred not found"
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert "longred/storage/FORMAT.md" in names
    assert not any(n.split("/")[0] in {"storage", "train", "precompute", "eval", "src"} for n in names)
