"""The tools check their arguments and config in one place before anything is created
(mabn_d2.validation) and report a user error one way (mabn_d2.cli): one message naming the
key and the fix, exit code 2, no traceback unless --debug / MABN_D2_DEBUG=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from mabn_d2.cli import UserError
from mabn_d2.validation import (
    apply_lazy_overrides,
    check_launch_args,
    check_output_dir,
    check_weights_file,
    load_yacs_cfg,
    validate_lazy_cfg,
    validate_yacs_cfg,
)

from helpers import CONFIGS, REPO, import_script, subprocess_env

DEMO = CONFIGS / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.yaml"
LAZY_DEMO = CONFIGS / "lazy" / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.py"


def _train_net(argv, capsys):
    train_net = import_script("tools/train_net.py")

    code = train_net.cli([str(a) for a in argv])
    return code, capsys.readouterr()


def _lazy_tool(argv, capsys):
    lazyconfig_train_net = import_script("tools/lazyconfig_train_net.py")

    code = lazyconfig_train_net.cli([str(a) for a in argv])
    return code, capsys.readouterr()


# ---- YACS values -----------------------------------------------------------------------------

def test_an_int_where_a_float_is_expected_is_accepted():
    cfg = load_yacs_cfg(str(DEMO), ["MODEL.MABN.MOMENTUM", "1"])
    assert cfg.MODEL.MABN.MOMENTUM == 1.0 and isinstance(cfg.MODEL.MABN.MOMENTUM, float)


def test_an_int_in_a_yaml_file_where_a_float_is_expected_is_accepted(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  MABN:\n    MOMENTUM: 1\n')
    assert load_yacs_cfg(str(config), []).MODEL.MABN.MOMENTUM == 1.0


@pytest.mark.parametrize("opts, message", [
    (["MODEL.MABN.BACKWARD_MOVING_AVERAGE", "yes"],
     "MODEL.MABN.BACKWARD_MOVING_AVERAGE must be True or False, got 'yes'"),
    (["SOLVER.MAX_ITER", "many"], "SOLVER.MAX_ITER must be an integer"),
    (["SOLVER.MAX_ITERS", "5"], "Non-existent key: SOLVER.MAX_ITERS .check its spelling"),
    (["SOLVER.MAX_ITER"], "must be KEY VALUE pairs"),
])
def test_bad_yacs_overrides_are_user_errors_naming_the_key(opts, message):
    with pytest.raises(UserError, match=message):
        load_yacs_cfg(str(DEMO), opts)


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be an integer >= 1, got 0"),
    (["MODEL.MABN.BUFFER_SIZE", "1000000000"],
     "MODEL.MABN.BUFFER_SIZE must be an integer in [1, 1024], got 1000000000"),
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be an integer >= 1"),
    (["SOLVER.BASE_LR", "-1"], "SOLVER.BASE_LR must be a finite number >= 0, got -1"),
])
def test_out_of_range_numbers_are_refused_before_anything_is_created(tmp_path, opts, message):
    out = tmp_path / "out"
    cfg = load_yacs_cfg(str(DEMO), [*opts, "OUTPUT_DIR", str(out)])
    with pytest.raises(UserError) as info:
        validate_yacs_cfg(cfg)
    assert message in str(info.value)
    assert not out.exists()


def test_warm_up_beyond_the_schedule_warns():
    cfg = load_yacs_cfg(str(DEMO), ["SOLVER.MAX_ITER", "10", "MODEL.MABN.WARMUP_ITERS", "50"])
    with pytest.warns(RuntimeWarning, match="MABN never leaves its warm-up"):
        validate_yacs_cfg(cfg)


# ---- OUTPUT_DIR and weights files ------------------------------------------------------------

def test_output_dir_that_is_a_file_is_a_user_error(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(str(path), "OUTPUT_DIR")
    with pytest.raises(UserError, match="lies under .* which is a file"):
        check_output_dir(str(path / "sub"), "OUTPUT_DIR")


_AS_NOBODY = """
import os, sys
from mabn_d2.cli import UserError
from mabn_d2.validation import check_output_dir
from mabn_d2.engine.output_lock import OutputDirLock
os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter may be root's only
what, path = sys.argv[1], sys.argv[2]
try:
    if what == "check":
        check_output_dir(path, "OUTPUT_DIR")
    else:
        OutputDirLock(path).acquire()
    print("OK")
except UserError as error:
    print("USER ERROR:", error)
"""


def _as_other_user(what: str, path) -> str:
    """Run the check as another user (uid 65534) when the tests run as root, who passes any
    permission check; as ourselves otherwise."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    proc = subprocess.run([sys.executable, "-c", _AS_NOBODY, what, str(path)],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(REPO), cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def shared_dir():
    """A folder another user can reach (pytest's tmp_path is private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="mabn_d2_shared_"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.e2e  # a child process as another user
def test_output_dir_without_write_permission_is_a_user_error(shared_dir):
    locked = shared_dir / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    assert "is not writable by this user" in _as_other_user("check", locked / "run")
    assert "is not writable by this user" in _as_other_user("check", locked)


@pytest.mark.e2e  # a child process as another user
def test_a_finished_runs_lock_file_of_another_user_does_not_block(shared_dir):
    out = shared_dir / "shared_out"
    out.mkdir()
    os.chmod(out, 0o777)
    lock = out / ".mabn_d2.lock"
    lock.write_text('{"pid": 1, "host": "h", "started": "s", "command": "c"}')
    os.chmod(lock, 0o644)  # owned by root, a finished run
    assert _as_other_user("lock", out).strip() == "OK"


def test_weights_files_that_are_not_checkpoints_are_user_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(100)}}, good)
    check_weights_file(str(good), "MODEL.WEIGHTS")
    empty, text, truncated = tmp_path / "e.pth", tmp_path / "t.pth", tmp_path / "cut.pth"
    empty.write_bytes(b"")
    text.write_text("not a checkpoint\n")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, message in [(empty, "is empty"), (text, "is a text file"),
                          (truncated, "truncated or damaged"),
                          (tmp_path / "missing.pth", "no such file")]:
        with pytest.raises(UserError, match=message) as info:
            check_weights_file(str(path), "MODEL.WEIGHTS")
        assert str(info.value).startswith(f"MODEL.WEIGHTS {path}")
    assert zipfile.is_zipfile(good)


# ---- launch ----------------------------------------------------------------------------------

def test_negative_num_gpus_is_refused():
    import argparse

    with pytest.raises(UserError, match="--num-gpus must be an integer >= 0, got -1"):
        check_launch_args(argparse.Namespace(num_gpus=-1, num_machines=1, machine_rank=0))
    check_launch_args(argparse.Namespace(num_gpus=0, num_machines=1, machine_rank=0))


# ---- LazyConfig overrides --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lazy_cfg():
    from detectron2.config import LazyConfig

    return LazyConfig.load(str(LAZY_DEMO))


@pytest.mark.parametrize("override, message", [
    ("train.max_iters=1", "override train.max_iters: no such key .*did you mean train.max_iter"),
    ("train.no_such_key=1", "override train.no_such_key: no such key"),
    ("=5", "the part before '=' must be a dotted key"),
    ("train.max_iter", "has no '='"),
    ("model.backbone.no_such_arg=1", "model.backbone builds FPN, which has no argument "
                                     "'no_such_arg'"),
])
def test_bad_lazy_overrides_are_user_errors_naming_the_key(lazy_cfg, override, message):
    with pytest.raises(UserError, match=message):
        apply_lazy_overrides(lazy_cfg.copy(), [override])


def test_good_lazy_overrides_apply(lazy_cfg):
    cfg = apply_lazy_overrides(lazy_cfg.copy(), [
        "train.max_iter=7", "train.seed=3", "model.backbone.fuse_type=avg", "+train.extra=1"])
    assert (cfg.train.max_iter, cfg.train.seed, cfg.model.backbone.fuse_type,
            cfg.train.extra) == (7, 3, "avg", 1)


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=0", "train.max_iter must be an integer >= 1, got 0"),
    ("mabn.buffer_size=1e9", "mabn.buffer_size must be an integer in [1, 1024]"),
    ("model.roi_heads.num_classes=0", "model.roi_heads.num_classes must be an integer >= 1"),
    ("train.checkpointer.period=0", "train.checkpointer.period must be an integer >= 1"),
])
def test_lazy_numbers_are_refused_before_anything_is_created(lazy_cfg, tmp_path, override,
                                                             message):
    out = tmp_path / "out"
    cfg = apply_lazy_overrides(lazy_cfg.copy(), [override, f"train.output_dir={out}"])
    with pytest.raises(UserError) as info:
        validate_lazy_cfg(cfg)
    assert message in str(info.value)
    assert not out.exists()


def test_lazy_warm_up_beyond_the_schedule_warns_and_eval_only_skips_the_schedule(lazy_cfg,
                                                                                 tmp_path):
    cfg = apply_lazy_overrides(lazy_cfg.copy(), ["train.max_iter=10", "mabn.warmup_iters=50",
                                                 f"train.output_dir={tmp_path / 'out'}"])
    with pytest.warns(RuntimeWarning, match="mabn.warmup_iters=50 .* train.max_iter=10"):
        validate_lazy_cfg(cfg)
    cfg = apply_lazy_overrides(cfg, ["train.max_iter=0", "train.init_checkpoint=/no/such.pth"])
    with pytest.raises(UserError, match="train.init_checkpoint /no/such.pth: no such file"):
        validate_lazy_cfg(cfg, eval_only=True)  # max_iter 0 is no matter to an evaluation


# ---- the tools: one message, exit code 2, --debug ---------------------------------------------

@pytest.mark.parametrize("opts, message", [
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be an integer >= 1, got 0"),
    (["MODEL.MABN.BUFFER_SIZE", "1000000000"], "MODEL.MABN.BUFFER_SIZE must be an integer"),
    (["MODEL.WEIGHTS", "/no/such/model.pth"], "MODEL.WEIGHTS /no/such/model.pth: no such file"),
])
def test_train_net_reports_user_errors_with_exit_code_2(tmp_path, capsys, opts, message):
    out = tmp_path / "out"
    code, captured = _train_net(["--config-file", DEMO, *opts, "OUTPUT_DIR", out], capsys)
    assert code == 2
    assert message in captured.err and "Traceback" not in captured.err
    assert not out.exists()


def test_train_net_eval_only_with_a_text_weights_file(tmp_path, capsys):
    weights = tmp_path / "model.pth"
    weights.write_text("hello")
    code, captured = _train_net(["--config-file", DEMO, "--eval-only", "MODEL.WEIGHTS", weights,
                                 "OUTPUT_DIR", tmp_path / "out"], capsys)
    assert code == 2 and "is a text file, not a checkpoint" in captured.err


def test_train_net_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("")
    code, captured = _train_net(["--config-file", DEMO, "OUTPUT_DIR", out], capsys)
    assert code == 2 and "is a file, not a folder" in captured.err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, captured = _train_net(["--config-file", DEMO, "--debug", "SOLVER.MAX_ITER", "0",
                                 "OUTPUT_DIR", tmp_path / "out"], capsys)
    assert code == 2 and "Traceback" in captured.err


@pytest.mark.parametrize("opts, message", [
    (["train.max_iters=1"], "did you mean train.max_iter"),
    (["=5"], "the part before '=' must be a dotted key"),
    (["train.max_iter=0"], "train.max_iter must be an integer >= 1, got 0"),
    (["mabn.buffer_size=1000000000"], "mabn.buffer_size must be an integer in [1, 1024]"),
])
def test_lazy_tool_reports_user_errors_with_exit_code_2(tmp_path, capsys, opts, message):
    out = tmp_path / "out"
    code, captured = _lazy_tool(["--config-file", LAZY_DEMO, *opts,
                                 f"train.output_dir={out}"], capsys)
    assert code == 2
    assert message in captured.err and "Traceback" not in captured.err
    assert not out.exists()


def test_num_gpus_minus_one_is_refused_by_both_training_tools(tmp_path, capsys):
    code, captured = _train_net(["--num-gpus", "-1", "--config-file", DEMO], capsys)
    assert code == 2 and "--num-gpus must be an integer >= 0" in captured.err
    code, captured = _lazy_tool(["--num-gpus", "-1", "--config-file", LAZY_DEMO], capsys)
    assert code == 2 and "--num-gpus must be an integer >= 0" in captured.err


@pytest.mark.e2e  # a command-line run
def test_register_coco_with_a_missing_image_is_refused_before_training(tmp_path):
    """A subprocess: the set-up before registration installs detectron2's log handlers on
    this process's streams."""
    from mabn_d2.data import ShapesSpec, write_split

    write_split(ShapesSpec(num_images=3, seed=5), tmp_path / "images", tmp_path / "a.json")
    (tmp_path / "images" / "000003.png").unlink()
    entry = repr([["user_missing_image", str(tmp_path / "a.json"), str(tmp_path / "images")]])
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(DEMO),
         "DATASETS.REGISTER_COCO", entry, "DATASETS.TRAIN", "('user_missing_image',)",
         "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'000003.png': missing on disk" in proc.stderr
    assert "Traceback" not in proc.stderr
