"""tools/convert_checkpoint.py at the edges: --affine on GroupNorm-like entries is not called
an exact fold (refused where the checkpoint records GroupNorm); --buffer-size is bounded; a
truncated input is one message with exit code 2."""

from __future__ import annotations

import pytest
import torch

from helpers import import_script, run_tool

# ---- the converter ---------------------------------------------------------------------------

def test_converter_affine_on_groupnorm_is_not_called_exact(tmp_path):
    state = {f"layer{i}.norm.{leaf}": torch.rand(8) for i in range(3) for leaf in ("weight",
                                                                                 "bias")}
    torch.save({"model": state}, tmp_path / "gn.pth")
    code, output = run_tool(str(tmp_path / "gn.pth"), str(tmp_path / "out.pth"), "--affine")
    assert code == 0 and "exact fold" not in output and "NOT exact" in output


def test_converter_refuses_affine_on_recorded_groupnorm(tmp_path):
    from mabn_d2.finetune.model_record import RECORD_KEY

    state = {"layer.norm.weight": torch.rand(8), "layer.norm.bias": torch.rand(8)}
    torch.save({"model": state, RECORD_KEY: {"norms": {"layer.norm": "GroupNorm"}}},
               tmp_path / "gn.pth")
    code, output = run_tool(str(tmp_path / "gn.pth"), str(tmp_path / "out.pth"), "--affine")
    assert code == 2 and "layer.norm (GroupNorm)" in output
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("args, message", [
    (("--buffer-size", "1000000000"), "--buffer-size must be an integer in [1, 1024]"),
])
def test_converter_bounds_the_buffer_size(tmp_path, capsys, args, message):
    convert_checkpoint = import_script("tools/convert_checkpoint.py")

    with pytest.raises(SystemExit) as info:
        convert_checkpoint.main([str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_converter_refuses_truncated_input_with_exit_code_2(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    code, output = run_tool(str(tmp_path / "cut.pth"), str(tmp_path / "out.pth"))
    assert code == 2 and "truncated or damaged" in output and "Traceback" not in output
