"""tools/benchmark.py runs end to end at layer level and writes what it prints (tiny shapes)."""

from __future__ import annotations

import json

import pytest
import torch

import benchmark  # tools/ is on the tests' path (pyproject.toml)


def test_layer_benchmark_writes_ratios_and_first_calls(tmp_path):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--only", "layer", "--shapes", "2,32,6,5", "16,32,7,7",
                              "--repeats", "2", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["layer"] == results["layer"]
    names = {r["candidate"] for r in saved["layer"]}
    assert {"MABN2d", "MABN2d_plain", "BatchNorm2d", "GroupNorm32", "naive_MABN"} <= names
    bn = {tuple(r["shape"]): r for r in saved["layer"] if r["candidate"] == "BatchNorm2d"}
    assert set(bn) == {(2, 32, 6, 5), (16, 32, 7, 7)}
    for row in saved["layer"]:
        assert row["runs"] == 2 and row["calls_per_run"] >= 1
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["first_call_median_s"] > 0 and row["peak_bytes"] > 0
        base = bn[tuple(row["shape"])]  # each ratio against BatchNorm2d at the same shape
        assert row["ratio_to_bn"] == pytest.approx(row["median_s"] / base["median_s"])
        assert row["first_call_ratio_to_bn"] == pytest.approx(
            row["first_call_median_s"] / base["first_call_median_s"])
        assert row["peak_ratio_to_bn"] == pytest.approx(row["peak_bytes"] / base["peak_bytes"])
    # y and dx: two activation-sized outputs for MABN2d, at least one more for the naive one.
    mabn = next(r for r in saved["layer"] if r["candidate"] == "MABN2d")
    naive = next(r for r in saved["layer"] if r["candidate"] == "naive_MABN")
    assert mabn["peak_bytes"] < naive["peak_bytes"]
    assert "| (2, 32, 6, 5) | MABN2d |" in out.with_suffix(".md").read_text()


def test_inference_benchmark_times_eager_and_deployed_models(monkeypatch):
    full_cfg = benchmark.model_cfg

    def small_cfg(norm, image_size, device):  # few RoIs: seconds, not minutes
        cfg = full_cfg(norm, image_size, device)
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 40
        cfg.TEST.DETECTIONS_PER_IMAGE = 10
        return cfg

    monkeypatch.setattr(benchmark, "model_cfg", small_cfg)
    rows = {r["candidate"]: r for r in benchmark.bench_model_inference(1, 96, torch.device("cpu"))}
    assert set(rows) == {f"{n}{m}" for n in ("fused_MABN", "FrozenBN", "GN")
                         for m in ("", "_deployed", "_fastest")}
    for name, row in rows.items():
        assert row["detections"] == 10 and row["median_s"] > 0
        if name.endswith("_deployed"):
            assert row["max_box_diff_to_eager"] < 1e-2 and row["max_score_diff_to_eager"] < 1e-4
    for name, row in rows.items():  # each form against FrozenBN and fused MABN in that form
        form = name[name.rfind("_"):] if name.endswith(("_deployed", "_fastest")) else ""
        for key, base in (("ratio_to_frozen_bn", "FrozenBN"), ("ratio_to_fused_mabn",
                                                                 "fused_MABN")):
            assert row[key] == pytest.approx(row["median_s"] / rows[base + form]["median_s"])
    for norm in ("fused_MABN", "FrozenBN", "GN"):
        forms = {"eager": rows[norm]["median_s"], "deployed": rows[f"{norm}_deployed"]["median_s"]}
        fastest = rows[f"{norm}_fastest"]
        assert fastest["median_s"] == min(forms.values())
        assert forms[fastest["fastest_form"]] == fastest["median_s"]
