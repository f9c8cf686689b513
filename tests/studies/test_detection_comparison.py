"""studies/detection_comparison.py: the commands it runs and how it reads and summarizes AP
(no training here; the comparison itself is a long CPU job)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import import_script

driver = import_script("studies/detection_comparison.py")



def test_commands_override_norm_schedule_seed_and_centralization(tmp_path):
    assert driver.base_schedule(driver.DEMO_CONFIG) == (600, (450,))
    cmd = driver.train_command(driver.DEMO_CONFIG, "MABN w/o centralization", 2, 1,
                               tmp_path / "run", (400, (300,)))
    opts = dict(zip(cmd[4::2], cmd[5::2]))
    assert cmd[1].endswith("tools/train_net.py") and cmd[3] == str(driver.DEMO_CONFIG)
    assert opts["SOLVER.MAX_ITER"] == "800" and opts["SOLVER.STEPS"] == "(600,)"
    assert opts["SEED"] == "1" and opts["OUTPUT_DIR"] == str(tmp_path / "run")
    assert all(opts[key] == "MABN" for key in driver.NORM_KEYS)
    assert opts["MODEL.MABN.CENTRALIZE_WEIGHTS"] == "False"
    assert driver.run_dir(tmp_path, "MABN w/o centralization", 2, 1).name == \
        "mabn_wo_centralization_x2_seed1"


def test_reads_ap_and_summarizes_over_seeds(tmp_path):
    assert driver.read_ap(tmp_path) is None
    (tmp_path / "eval_results.json").write_text(json.dumps(
        {"mabn_demo_shapes_val": {"bbox": {"AP": 50.0}, "segm": {"AP": 40.0}}}))
    assert driver.read_ap(tmp_path) == {"box_AP": 50.0, "mask_AP": 40.0}
    runs = [{"setting": "GN", "schedule": 1, "seed": s, "box_AP": ap, "mask_AP": ap - 1}
            for s, ap in enumerate((50.0, 54.0))]
    runs.append({"setting": "BN", "schedule": 1, "seed": 0, "box_AP": None, "mask_AP": None})
    (row,) = driver.summarize(runs)
    assert row["setting"] == "GN" and row["seeds"] == 2
    assert row["box_AP"] == 52.0 and row["mask_AP"] == 51.0
    assert row["box_AP_std"] == pytest.approx(2 ** 1.5)
    assert "| GN | 400 | 52.0 ± 2.8 | 51.0 ± 2.8 | 2 |" in driver.format_table([row], 400)


def _write_ap(out_dir, box, mask):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_results.json").write_text(json.dumps(
        {"mabn_demo_shapes_val": {"bbox": {"AP": box}, "segm": {"AP": mask}}}))


def test_parallel_runs_skip_finished_ones_and_write_table_json_png(tmp_path, monkeypatch):
    _write_ap(driver.run_dir(tmp_path, "GN", 1, 0), 50.0, 45.0)  # finished earlier
    trained = []

    def fake_run(cmd, stdout, stderr, cwd, env):
        opts = dict(zip(cmd[4::2], cmd[5::2]))
        assert env["OMP_NUM_THREADS"] == "1"
        trained.append(opts["MODEL.RESNETS.NORM"])
        _write_ap(Path(opts["OUTPUT_DIR"]), 40.0 + int(opts["SEED"]), 30.0)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = driver.main(["--norms", "GN", "MABN", "--schedules", "1", "--seeds", "2",
                        "--jobs", "2", "--out", str(tmp_path)], run=fake_run)
    assert sorted(trained) == ["GN", "MABN", "MABN"]  # GN seed 0 was not trained again
    by_setting = {r["setting"]: r for r in rows}
    assert by_setting["GN"]["box_AP_values"] == [50.0, 41.0]
    assert by_setting["MABN"]["box_AP"] == 40.5
    summary = json.loads((tmp_path / "detection_comparison.json").read_text())
    assert len(summary["runs"]) == 4 and (tmp_path / "detection_comparison.png").stat().st_size


def test_a_failed_run_is_an_error_naming_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"GN, x1, seed 0 failed \(exit 3\).*train_net.log"):
        driver.main(["--norms", "GN", "--schedules", "1", "--seeds", "1",
                     "--out", str(tmp_path)],
                    run=lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 3))


def test_no_train_summarizes_finished_runs_only(tmp_path):
    _write_ap(driver.run_dir(tmp_path, "BN", 2, 1), 30.0, 25.0)
    rows = driver.main(["--no-train", "--out", str(tmp_path)],
                       run=lambda *a, **k: pytest.fail("trained"))
    assert [(r["setting"], r["schedule"], r["seeds"]) for r in rows] == [("BN", 2, 1)]
    assert "| BN | 800 | 30.0 ± 0.0 | 25.0 ± 0.0 | 1 |" in driver.format_table(rows, 400)


def test_reused_runs_count_as_finished_and_other_configs_are_refused(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "config": str(driver.DEMO_CONFIG), "base_max_iter": 600,
        "runs": [{"setting": "GN", "schedule": 1, "seed": 0, "box_AP": 70.0, "mask_AP": 60.0},
                 {"setting": "GN", "schedule": 1, "seed": 1, "box_AP": None, "mask_AP": None}]}))
    demo = tmp_path / "expected_results.json"
    demo.write_text(json.dumps({"config": "configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml",
                                "runs": [{"seed": 0, "box_AP": 76.0, "mask_AP": 71.0,
                                          "seconds": 300}]}))
    trained = []

    def fake_run(cmd, stdout, stderr, cwd, env):
        opts = dict(zip(cmd[4::2], cmd[5::2]))
        trained.append((opts["MODEL.RESNETS.NORM"], opts["SEED"]))
        _write_ap(Path(opts["OUTPUT_DIR"]), 50.0, 40.0)
        return subprocess.CompletedProcess(cmd, 0)

    rows = driver.main(["--norms", "GN", "MABN", "--schedules", "1", "--seeds", "2", "--out",
                        str(tmp_path / "out"), "--reuse", str(earlier), str(demo)], run=fake_run)
    # GN seed 1 was not finished in the earlier file: trained; MABN seed 0 is the demo's run
    assert sorted(trained) == [("GN", "1"), ("MABN", "1")]
    by_setting = {r["setting"]: r for r in rows}
    assert by_setting["GN"]["box_AP_values"] == [70.0, 50.0]
    assert by_setting["MABN"]["box_AP_values"] == [76.0, 50.0]
    # recorded relative to the repository, so that another clone can reuse the file
    written = json.loads((tmp_path / "out" / "detection_comparison.json").read_text())
    assert written["config"] == "configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": "configs/other.yaml", "base_max_iter": 600,
                                 "runs": []}))
    with pytest.raises(ValueError, match="reuse only runs of the same config"):
        driver.main(["--dry-run", "--reuse", str(other)])
    earlier.write_text(json.dumps({"config": str(driver.DEMO_CONFIG), "base_max_iter": 400,
                                   "runs": []}))
    with pytest.raises(ValueError, match="base schedule 400 iterations, not 600"):
        driver.main(["--dry-run", "--reuse", str(earlier)])
