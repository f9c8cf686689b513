"""dev/gpu_check.py and dev/gpu_wheelhouse.py without a GPU or a network: offline installs,
the report, time limits, and the wheelhouse's checks on wheels made here."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import import_script

gpu_check = import_script("dev/gpu_check.py")
gpu_wheelhouse = import_script("dev/gpu_wheelhouse.py")



def make_wheel(folder: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = (),
               tag: str = "py3-none-any", payload: int = 0) -> Path:
    """A minimal valid wheel with one module (and ``payload`` bytes of data)."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "VALUE = 42\n" + "#" * payload,
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              f"Tag: {tag}\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    path = folder / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in {**files, f"{dist_info}/RECORD": record}.items():
            archive.writestr(file, text)
    return path


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_install_part_installs_the_wheelhouse_without_an_index(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    make_wheel(wheelhouse, "probe-package")
    site, out = tmp_path / "site", tmp_path / "out"
    status = gpu_check.main(["--wheelhouse", str(wheelhouse), "--site", str(site),
                             "--out", str(out), "--parts", "install"])
    assert status == 0
    assert (site / "probe_package" / "__init__.py").read_text().startswith("VALUE = 42")
    (part,) = report_of(out)["parts"]
    assert part["name"] == "install" and part["status"] == "passed"
    assert "--no-index" in (out / "parts.log").read_text()
    assert "| install | passed |" in (out / "report.md").read_text()


@pytest.mark.e2e  # a child pytest run
def test_cuda_tier_is_collected_and_judged(tmp_path):
    # No GPU here: every test of the tier is collected and skipped with the reason; expected
    # in a rehearsal (--no-cuda), a failure where a GPU is expected.
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--parts", "cuda_tier", "--no-cuda"]) == 0
    report = report_of(out)
    tests = report["cuda_tier"]
    assert len(tests) >= 15 and {t["outcome"] for t in tests} == {"skipped"}
    assert all("[cuda" in t["name"] for t in tests)
    assert "no CUDA device here" in tests[0]["message"]
    assert report["parts"][0]["why"].startswith("no CUDA here")
    part = gpu_check.Part("cuda_tier", [], 1, {"status": "passed"})
    gpu_check.judge_cuda_tier(part, tests, cuda_expected=True)
    assert part.result["status"] == "failed" and "skipped on a GPU machine" in part.result["why"]
    part = gpu_check.Part("cuda_tier", [], 1, {"status": "passed"})
    gpu_check.judge_cuda_tier(part, [], cuda_expected=False)
    assert part.result["status"] == "failed" and part.result["why"] == "no test collected"


def test_spent_budget_and_timeouts_are_reported(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--parts", "environment,cuda_tier",
                           "--budget-s", "0"]) == 1
    parts = report_of(out)["parts"]
    assert [p["status"] for p in parts] == ["not run", "not run"]
    assert "budget spent" in (out / "report.md").read_text()
    part = gpu_check.Part("slow", [sys.executable, "-c",
                                   "import time; print('started', flush=True); time.sleep(60)"], 2)
    with open(tmp_path / "log", "w") as log:
        gpu_check.run_part(part, {}, log, deadline=float("inf"))
    assert part.result["status"] == "timeout" and part.result["seconds"] < 30
    assert "started" in (tmp_path / "log").read_text()


def test_unknown_part_and_empty_wheelhouse_are_refused(tmp_path, capsys):
    for argv, message in ((["--parts", "cuda_tier,gpu_magic"], "unknown ['gpu_magic']"),
                          (["--wheelhouse", str(tmp_path)], "no .whl files there")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--out", str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


IMAGE = {"numpy", "torch", "pyyaml"}


def check(folder: Path, **kwargs) -> list[str]:
    return gpu_wheelhouse.check_wheelhouse(folder, IMAGE, import_chain=["torch", "good"],
                                           **kwargs)[1]


def test_wheelhouse_check_accepts_a_closed_set(tmp_path):
    make_wheel(tmp_path, "good", requires=("helper>=1", "numpy", 'old; python_version < "3.8"',
                                           'fancy; extra == "all"', 'win; sys_platform == "win32"'))
    make_wheel(tmp_path, "helper", requires=("PyYAML",))
    make_wheel(tmp_path, "native", tag="cp312-abi3-manylinux_2_17_x86_64")
    wheels, problems = gpu_wheelhouse.check_wheelhouse(tmp_path, IMAGE, import_chain=["good"])
    assert problems == []
    assert {w["name"] for w in wheels} == {"good", "helper", "native"}
    assert all(len(w["sha256"]) == 64 and w["bytes"] > 0 for w in wheels)


def test_wheelhouse_check_names_each_problem(tmp_path):
    make_wheel(tmp_path, "good", requires=("missing-dep",))
    make_wheel(tmp_path, "twice", "1.0")
    make_wheel(tmp_path, "twice", "2.0")
    make_wheel(tmp_path, "wrong-python", tag="cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "wrong-platform", tag="py3-none-macosx_11_0_arm64")
    make_wheel(tmp_path, "big", payload=3000)
    problems = check(tmp_path, limit_bytes=2000)
    assert len(problems) == 5, problems
    assert any("good requires missing-dep" in p for p in problems)
    assert any(p.startswith("twice: 2 wheels") for p in problems)
    assert any("wrong_python-1.0-cp311" in p for p in problems)
    assert any("wrong_platform-1.0-py3-none-macosx" in p for p in problems)
    assert any("more than the limit of" in p for p in problems)
    (tmp_path / "good-1.0-py3-none-any.whl").unlink()
    assert any("the import chain needs good" in p for p in check(tmp_path))


def test_image_package_list_has_the_gpu_machines_stack_and_not_what_travels():
    image = gpu_wheelhouse.image_packages()
    assert {"torch", "torchvision", "triton", "numpy", "pillow", "pytest", "ninja",
            "pytest-timeout", "opencv-python-headless"} <= image
    carried = {*gpu_wheelhouse.PURE_WHEELS, *gpu_wheelhouse.BINARY_WHEELS, "detectron2"}
    assert not image & carried
