"""One distribution, `shadowfx`; passes/ and runtimes/ ship only as shadowfx.passes and shadowfx.runtimes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import shadowfx.passes
import shadowfx.runtimes

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_map_to_their_folders():
    assert Path(shadowfx.passes.__file__).parent == ROOT / "passes"
    assert Path(shadowfx.runtimes.__file__).parent == ROOT / "runtimes"


def test_wheel_has_no_generic_top_level_modules(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("shadowfx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"shadowfx"}
    assert "shadowfx/passes/discover_structure.py" in names
    assert "shadowfx/runtimes/__init__.py" in names
