"""`bench/gpu_check.py --smoke`: the GPU acceptance script's code paths, run on CPU so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_row_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table}
    for check in ("float32 matmul peak", "tokens/s", "MFU vs the measured peak", "dispersion overhead",
                  "condense GPT-2", "evaluation of bundled_cloze", "ZeRO-3 vs ZeRO-2"):
        assert any(check in name for name in rows), (check, done.stdout)
    assert not any("FAILED" in line for line in table), done.stdout
    zero3 = next(line for name, line in rows.items() if name.startswith("ZeRO-3 vs ZeRO-2"))
    assert zero3.rstrip(" |").endswith("met") and "NOT MET" not in zero3
    assert (tmp_path / "condense-rank-on" / "condensation.json").is_file()
