"""The study and benchmark scripts refuse invalid numbers by name, before any work (they used
to start, then fail deep inside or compute nothing: 0 repeats, a NaN learning rate, 0 threads
silently taken as the default, 0 fine-tuning iterations)."""

from __future__ import annotations

import pytest

from helpers import import_script

benchmark = import_script("studies/benchmark.py")
finetune_start_study = import_script("studies/finetune_start_study.py")
small_batch_study = import_script("studies/small_batch_study.py")



@pytest.mark.parametrize("main, args, message", [
    (benchmark.main, ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (benchmark.main, ["--model-repeats", "-2"], "--model-repeats must be >= 1, got -2"),
    (benchmark.main, ["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (benchmark.main, ["--threads", "0"], "--threads must be >= 1, got 0"),
    (small_batch_study.parse_args, ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (small_batch_study.parse_args, ["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (small_batch_study.parse_args, ["--threads", "0"], "--threads must be >= 1, got 0"),
    (small_batch_study.parse_args, ["--record-every", "-1"], "--record-every must be >= 0"),
    (finetune_start_study.main, ["--iters", "0"], "--iters must be >= 1, got 0"),
    (finetune_start_study.main, ["--calibration-batches", "0"],
     "--calibration-batches must be >= 1, got 0"),
    (finetune_start_study.main, ["--iters", "5", "--last", "10"],
     "--last (10) must be <= --iters (5)"),
])
def test_invalid_numbers_are_refused_by_name(capsys, main, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shapes", [["0,8,4,4"], ["2,8,4"], ["2,x,4,4"]])
def test_benchmark_shapes_must_be_four_positive_integers(shapes):
    with pytest.raises(SystemExit, match="--shapes: expected"):
        benchmark.parse_shapes(shapes, quick=False)
