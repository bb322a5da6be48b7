"""What ``send --wait`` prints while it follows one command: state changes, presence,
the link, and a firmware transfer's progress."""

from __future__ import annotations

import sys
from typing import Any

from keeplink.gateway_client import FINAL_STATES


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


class Follower:
    """Prints what happens to one command while ``send --wait`` follows it."""

    def __init__(self, command: dict[str, Any], *, quiet: bool, tty: bool) -> None:
        self.id = str(command.get("id"))
        self.device = str(command.get("device"))
        self.state = str(command.get("state"))
        self.quiet = quiet
        self.tty = tty
        self.bar_open = False
        self.next_step = 0.0

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar_open:
            sys.stdout.write("\n")
            self.bar_open = False
        print(text, flush=True)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "command":
            self._command(event["command"])
        elif kind == "firmware_progress":
            self._progress(event)
        elif kind == "presence":
            self._line(f"{self.device} is {event.get('new')}")
        elif kind == "link" and event.get("new") in ("connected", "failed"):
            error = event.get("error")
            why = f" [{error.get('code')}] {error.get('message')}" if error else ""
            self._line(f"{self.device}: link {event.get('new')}{why}")
        elif kind == "parked":
            reason = event.get("reason")
            if reason:
                self._line(f"{self.device}: delivery parked: {reason}")
            else:
                self._line(f"{self.device}: delivery resumed")

    def _command(self, command: dict[str, Any]) -> None:
        state = str(command.get("state"))
        if state == self.state or state in FINAL_STATES:
            self.state = state
            return  # the final state is reported by the caller
        self.state = state
        attempts, most = command.get("attempts"), command.get("max_attempts")
        if state == "sending":
            self._line(f"sending (attempt {attempts} of {most})")
        elif state == "queued":
            error = command.get("last_error")
            why = f" [{error.get('code')}] {error.get('message')}" if error else ""
            self._line(f"queued again after attempt {attempts} of {most}:{why}")
        else:
            self._line(state)

    def _progress(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        percent = float(event.get("percent") or 0.0)
        offset, size = event.get("offset") or 0, event.get("size") or 0
        rate = float(event.get("rate_bps") or 0.0)
        resumes = event.get("resumes") or 0
        resumed = f", resumed {resumes}x" if resumes else ""
        detail = (
            f"{percent:5.1f}%  {_human_bytes(offset)} of {_human_bytes(size)}  "
            f"{_human_bytes(rate)}/s{resumed}"
        )
        if self.tty:
            width = 30
            done = min(width, int(width * percent / 100))
            bar = "#" * done + "-" * (width - done)
            sys.stdout.write(f"\rfirmware [{bar}] {detail}\x1b[K")
            sys.stdout.flush()
            self.bar_open = True
            return
        if percent >= self.next_step or percent >= 100:
            self.next_step = (int(percent // 10) + 1) * 10
            print(f"firmware {detail}", flush=True)

    def close(self) -> None:
        if self.bar_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.bar_open = False
