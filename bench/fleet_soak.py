"""The fleet soak: three ``keeplink serve`` nodes on one PostgreSQL database, at scale.

    python -m bench.fleet_soak [--devices 300] [--commands 10] [--lease-s 3]

Runs the fleet scenario of ``tests/test_fleet_e2e.py`` (SIGKILL of a node, SIGSTOP of
another for three lease periods, a PostgreSQL restart, a SIGTERM handoff; commands
submitted through every node; ownership sampled throughout) with ``--devices`` simulated
devices and ``--commands`` commands per device and phase, and prints its summary: commands
accepted, takeover (in lease periods: the goal is two) and handoff times, ownership
samples. It fails (exit status 1) on a lost command, a command applied twice or out of
order, or a device with two owners at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--commands", type=int, default=10, help="per device and phase")
    parser.add_argument("--lease-s", type=float, default=3.0)
    args = parser.parse_args()
    env = {
        **os.environ,
        "KEEPLINK_FLEET_DEVICES": str(args.devices),
        "KEEPLINK_FLEET_COMMANDS": str(args.commands),
        "KEEPLINK_FLEET_LEASE_S": str(args.lease_s),
        "KEEPLINK_FLEET_TAKEOVER": "report",  # the time is printed against its goal
    }
    command = [
        sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
        "tests/test_fleet_e2e.py",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("fleet:")]
    print("\n".join(lines) or done.stdout[-3000:])
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
