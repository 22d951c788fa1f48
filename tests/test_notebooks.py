"""The notebooks run: a quick pass of each must produce its figure and meet expectations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_throughput_notebook_draws_its_figure(tmp_path: Path) -> None:
    output = tmp_path / "figure.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "notebooks" / "latency_throughput.py"),
            "--quick",
            f"--out={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'verdict': 'ok'" in result.stdout
    assert "'verdict': 'violated'" not in result.stdout
