"""studies/benchmark.py runs end to end at layer level and writes what it prints (tiny shapes)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import import_script

benchmark = import_script("studies/benchmark.py")



@pytest.mark.e2e  # the benchmark's runs, end to end
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
        # the memory floor (2.5 copies into a warm buffer) is one per shape, timed in the run
        assert row["memory_floor_s"] == base["memory_floor_s"] > 0
        assert row["ratio_to_floor"] == pytest.approx(row["median_s"] / row["memory_floor_s"])
    # y and dx: two activation-sized outputs for MABN2d, at least one more for the naive one.
    mabn = next(r for r in saved["layer"] if r["candidate"] == "MABN2d")
    naive = next(r for r in saved["layer"] if r["candidate"] == "naive_MABN")
    assert mabn["peak_bytes"] < naive["peak_bytes"]
    assert "| (2, 32, 6, 5) | float32 | MABN2d |" in out.with_suffix(".md").read_text()


@pytest.fixture
def few_rois(monkeypatch):
    full_cfg = benchmark.model_cfg

    def small_cfg(norm, image_size, device, width=None):  # few RoIs: seconds, not minutes
        cfg = full_cfg(norm, image_size, device, width)
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 40
        cfg.TEST.DETECTIONS_PER_IMAGE = 10
        return cfg

    monkeypatch.setattr(benchmark, "model_cfg", small_cfg)


@pytest.mark.e2e  # the benchmark's runs, end to end
def test_inference_benchmark_times_eager_and_deployed_models(few_rois):
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


@pytest.mark.e2e  # the benchmark's runs, end to end
def test_eager_inference_at_a_given_width(few_rois):
    rows = benchmark.bench_model_inference(1, 64, torch.device("cpu"), width=112,
                                           deployed_too=False)
    assert [r["candidate"] for r in rows] == ["fused_MABN", "FrozenBN", "GN"]
    assert all(r["image_width"] == 112 and r["mode"] == "eager" for r in rows)


def layer_row(shape, precision, ratio, memory):
    return {"shape": shape, "precision": precision, "candidate": "MABN2d", "ratio_to_bn": ratio,
            "peak_ratio_to_bn": memory}


def test_targets_compare_ratios_with_limits():
    results = {
        "layer": [layer_row([2, 256, 50, 68], "float32", 0.9, 1.0),
                  layer_row([2, 256, 50, 68], "amp_float16", 1.1, 0.8)],
        "model_training": [{"candidate": "MABN", "median_s": 1.0, "ratio_to_bn": 1.03},
                           {"candidate": "BN", "median_s": 1 / 1.03, "ratio_to_bn": 1.0},
                           {"candidate": "GN", "median_s": 1.2, "ratio_to_bn": 1.2}],
        "model_inference": [
            {"candidate": "fused_MABN", "mode": "eager", "ratio_to_frozen_bn": 1.04,
             "ratio_to_fused_mabn": 1.0},
            {"candidate": "FrozenBN", "mode": "eager", "median_s": 1.0, "min_s": 0.97,
             "max_s": 1.02, "ratio_to_frozen_bn": 1.0, "ratio_to_fused_mabn": 1 / 1.04},
            {"candidate": "GN", "mode": "eager", "ratio_to_frozen_bn": 1.3,
             "ratio_to_fused_mabn": 1.25}],
    }
    met = {t["target"]: t["met"] for t in benchmark.targets(results)}
    assert met == {
        "layer time MABN2d / BN (2, 256, 50, 68) float32": True,
        "layer peak memory MABN2d / BN (2, 256, 50, 68) float32": True,
        "layer time MABN2d / BN (2, 256, 50, 68) amp_float16": False,
        "layer peak memory MABN2d / BN (2, 256, 50, 68) amp_float16": True,
        "training iteration MABN / BN": False,
        "training iteration MABN / GN": True,
        # FrozenBN's runs spread by 5 %: 1.04 is within its noise.
        "inference fused MABN / FrozenBN (eager)": True,
        "inference GN / fused MABN (eager)": None,
    }
    results["model_inference"][0]["ratio_to_frozen_bn"] = 1.06
    assert not {t["target"]: t["met"] for t in benchmark.targets(results)}[
        "inference fused MABN / FrozenBN (eager)"]
    assert "| training iteration MABN / BN | 1.030 | <= 1.02 | **no** |" in benchmark.markdown(
        {**results, "layer": [], "model_training": [], "model_inference": [],
         "targets": benchmark.targets(results)})
