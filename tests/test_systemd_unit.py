"""The unit file passes `systemd-analyze verify` with no warning at all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's diffusiond.
    installed = Path(sys.executable).parent / "diffusiond"
    assert installed.exists(), "install the package (make setup) first"
    text = (UNITS / "diffusiond.service").read_text().replace("/opt/diffusiond/venv/bin/diffusiond", str(installed))
    unit = tmp_path / "diffusiond.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
