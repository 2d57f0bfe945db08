"""`make bench QUICK=1` end to end (slow: a few minutes): every key the performance issue names is written.
Speed is never asserted; only that each measurement ran and the values agree with the reference."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--workdir",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for key in ("harmonize_s", "gzip_s", "patches_per_s", "slices_per_s", "metrics_s", "sliding_window_s"):
        assert res.get(key) is not None, key
    for lib in ("ours", "monai", "torchio"):
        assert res["harmonize_s"][lib] > 0 and res["patches_per_s"][lib]["2"] > 0
    for key in ("harmonize_vs_gzip", "harmonize_vs_monai", "patches_vs_monai", "patches_vs_torchio",
                "metrics_vs_surface_distance", "metrics_max_abs_diff"):
        assert key in res["ratios"], key
    assert res["ratios"]["metrics_max_abs_diff"] <= 1e-6  # our surface metrics are DeepMind's values
    assert res["loop_overhead_ms_per_step"] is not None and set(res["loop_breakdown_ms"]) >= {"loader_wait", "loss"}
    assert "gpu" in res  # null without CUDA
    assert "| ratio | value |" in (out / "results.md").read_text(encoding="utf-8")
