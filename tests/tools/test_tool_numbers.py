"""The small scripts refuse out-of-range numbers by name (exit 2); plot_training_curves.py
--out DIR/ writes into the folder."""

from __future__ import annotations

import json

import pytest

from helpers import import_script

# ---- the small tools' numbers ----------------------------------------------------------------

@pytest.mark.parametrize("tool, args, message", [
    ("dev/demo_report.py", ["--threads", "-3"], "--threads: must be an integer >= 1"),
    ("dev/demo_report.py", ["--seconds", "-5"], "--seconds: must be a finite number >= 0"),
    ("dev/gpu_check.py", ["--budget-s", "-1"], "--budget-s: must be a finite number >= 0"),
])
def test_small_tools_refuse_out_of_range_numbers(capsys, tool, args, message):
    module = import_script(tool)
    with pytest.raises(SystemExit) as info:
        module.main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_plot_training_curves_out_folder_with_a_slash(tmp_path):
    plot_training_curves = import_script("tools/plot_training_curves.py")

    metrics = tmp_path / "metrics.json"
    metrics.write_text("\n".join(json.dumps({"iteration": i, "total_loss": 1.0 / (i + 1),
                                             "lr": 0.01}) for i in range(5)))
    out = tmp_path / "plots"
    assert plot_training_curves.main([str(metrics), "--out", f"{out}/"]) == 0
    assert (out / "training_curves.png").is_file()
    assert not (tmp_path / "plots.png").exists()


def test_plot_training_curves_out_under_a_file_is_one_message(tmp_path, capsys):
    plot_training_curves = import_script("tools/plot_training_curves.py")

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iteration": 0, "total_loss": 1.0, "lr": 0.01}))
    (tmp_path / "file").write_text("")
    assert plot_training_curves.main([str(metrics), "--out", str(tmp_path / "file" / "x.png")]
                                     ) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
