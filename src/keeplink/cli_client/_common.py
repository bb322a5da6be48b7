"""Exit codes, the command names and the defaults every client command shares."""

from __future__ import annotations

from typing import Final

from keeplink._core.commands import CommandState

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_AUTH: Final = 4
EXIT_NOT_FOUND: Final = 5
EXIT_WAIT_TIMEOUT: Final = 6
EXIT_INTERRUPTED: Final = 130

CLIENT_COMMANDS: Final = frozenset({"devices", "send", "commands", "cancel", "reconnect", "resume"})
COMMAND_STATES: Final[tuple[str, ...]] = tuple(state.value for state in CommandState)
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_WAIT_TIMEOUT_S: Final = 300.0
ERROR_WIDTH: Final = 48


class UsageError(Exception):
    """Bad usage found after argparse (exit 2)."""
