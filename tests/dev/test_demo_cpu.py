"""dev/demo_cpu.py: the demo's OpenMP wait policy from how busy the cores are."""

from __future__ import annotations

from helpers import import_script

demo_cpu = import_script("dev/demo_cpu.py")


def _stat(path, ticks_per_cpu):
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu, (busy, idle) in enumerate(ticks_per_cpu):
        lines.append(f"cpu{cpu} {busy} 0 0 {idle} 0 0 0 0 0 0")
    path.write_text("\n".join(lines) + "\nintr 1 2 3\n")


def test_idle_shares_are_measured_from_proc_stat_differences(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, [(100, 100), (100, 100)])
    # during the "sleep", cpu0 does 90 busy and 10 idle ticks, cpu1 is idle
    shares = demo_cpu.idle_shares([0, 1], 1.0, str(stat),
                                  sleep=lambda s: _stat(stat, [(190, 110), (100, 200)]))
    assert shares == [0.1, 1.0]


def test_active_only_when_the_cores_are_free():
    assert demo_cpu.choose_wait_policy([1.0, 0.95]) == "ACTIVE"
    assert demo_cpu.choose_wait_policy([0.9, 0.9]) == "ACTIVE"   # 1.8 of 2 cores free
    assert demo_cpu.choose_wait_policy([1.0, 0.5]) == "PASSIVE"  # half a core is taken
    assert demo_cpu.choose_wait_policy([0.6, 0.6]) == "PASSIVE"
    assert demo_cpu.choose_wait_policy([0.8]) == "ACTIVE"


def test_main_prints_the_policy_and_the_reason(capsys):
    assert demo_cpu.main(["--seconds", "0.2"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() in {"ACTIVE", "PASSIVE"}
    assert err.startswith(f"demo: OMP_WAIT_POLICY={out.strip()} (")


def test_a_given_policy_is_used_as_given_and_a_bad_one_names_the_make_variable(capsys):
    assert demo_cpu.main(["--policy", "passive"]) == 0
    assert capsys.readouterr().out == "PASSIVE\n"
    assert demo_cpu.main(["--policy", "fast"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "DEMO_WAIT_POLICY=fast: must be auto, ACTIVE or PASSIVE" in err
