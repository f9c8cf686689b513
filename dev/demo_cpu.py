#!/usr/bin/env python
"""OpenMP's wait policy for ``make demo``, chosen from how busy the CPUs are right now.

The demo always uses every core this process may use (its expected AP range was measured
so: another thread count rounds differently). Only the wait policy is chosen here, and it does
not change the arithmetic (same threads, same work split; seeds 0-2 gave the same AP to
every digit with both policies):

- ``ACTIVE`` (threads spin between parallel regions) when the cores are idle: 0.37-0.39
  instead of 0.55 s per demo iteration on an idle 2-core VM (docs/training.md);
- ``PASSIVE`` (threads sleep) when other work holds some of them: spinning threads then take
  turns with that work (2.11 instead of 1.23 s per iteration with both cores busy, 1.36
  instead of 0.89 with one).

Prints the policy on stdout and the reason on stderr; ``--policy`` is ``make demo``'s
``DEMO_WAIT_POLICY`` (auto, the default, or a policy to use as given)::

    OMP_WAIT_POLICY=$(python dev/demo_cpu.py --policy auto) python tools/train_net.py ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

# The cores count as free when their idle shares over the sampling interval add up to all but
# (1 - FREE_SHARE) of one core: the sampler's own start-up and stray daemons stay below that.
FREE_SHARE = 0.75
POLICIES = ("ACTIVE", "PASSIVE")


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """``{cpu: (idle ticks, all ticks)}`` since boot, from Linux's ``/proc/stat``."""
    times = {}
    with open(path) as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def idle_shares(cpus: Sequence[int], seconds: float, path: str = "/proc/stat",
                sleep: Callable[[float], object] = time.sleep) -> list[float]:
    """Each of ``cpus``' idle share over the next ``seconds`` (0 = busy all the time)."""
    before = _cpu_times(path)
    sleep(seconds)
    after = _cpu_times(path)
    shares = []
    for cpu in cpus:
        idle = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        shares.append(idle / total if total > 0 else 1.0)
    return shares


def choose_wait_policy(shares: Sequence[float]) -> str:
    """``ACTIVE`` when the cores are free (their idle shares add up to all but a quarter of a
    core), else ``PASSIVE``."""
    return "ACTIVE" if sum(shares) >= len(shares) - (1 - FREE_SHARE) else "PASSIVE"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.1:
        raise argparse.ArgumentTypeError(f"must be at least 0.1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="auto",
                        help="auto (choose from the cores' load), ACTIVE or PASSIVE")
    parser.add_argument("--seconds", type=_seconds, default=1.0,
                        help="how long to watch the CPUs (default 1)")
    args = parser.parse_args(argv)
    if args.policy.upper() in POLICIES:
        print(args.policy.upper())
        return 0
    if args.policy.lower() != "auto":
        print(f"DEMO_WAIT_POLICY={args.policy}: must be auto, ACTIVE or PASSIVE "
              "(e.g. make demo DEMO_WAIT_POLICY=PASSIVE)", file=sys.stderr)
        return 2
    cpus = allowed_cpus()
    try:
        shares = idle_shares(cpus, args.seconds)
        seen = ", ".join(f"{share:.0%}" for share in shares)
        reason = f"idle share of the {len(cpus)} cores over {args.seconds:g} s: {seen}"
    except (OSError, KeyError, ValueError, IndexError):  # no Linux /proc/stat
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float(len(cpus))
        shares = [max(0.0, 1.0 - load / len(cpus))] * len(cpus)
        reason = f"load average {load:.2f} on {len(cpus)} cores"
    policy = choose_wait_policy(shares)
    print(f"demo: OMP_WAIT_POLICY={policy} ({reason}; ACTIVE when the cores are free)",
          file=sys.stderr)
    print(policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
