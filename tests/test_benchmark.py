"""tools/benchmark.py runs end to end at layer level and writes what it prints (tiny shapes)."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402


def test_layer_benchmark_writes_ratios_and_first_calls(tmp_path):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--only", "layer", "--shapes", "2,32,6,5", "16,32,7,7",
                              "--repeats", "2", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["layer"] == results["layer"]
    names = {r["candidate"] for r in saved["layer"]}
    assert {"MABN2d", "MABN2d_plain", "BatchNorm2d", "GroupNorm32", "naive_MABN"} <= names
    for row in saved["layer"]:
        assert row["runs"] == 2 and row["calls_per_run"] >= 1
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["first_call_median_s"] > 0 and row["peak_bytes"] > 0
        if row["candidate"] == "BatchNorm2d":
            assert row["ratio_to_bn"] == 1.0 and row["peak_ratio_to_bn"] == 1.0
    # y and dx: two activation-sized outputs for MABN2d, at least one more for the naive one.
    mabn = next(r for r in saved["layer"] if r["candidate"] == "MABN2d")
    naive = next(r for r in saved["layer"] if r["candidate"] == "naive_MABN")
    assert mabn["peak_bytes"] < naive["peak_bytes"]
    assert "| (2, 32, 6, 5) | MABN2d |" in out.with_suffix(".md").read_text()
