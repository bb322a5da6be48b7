"""The gateway from a shell: ``keeplink devices | send | commands | cancel | reconnect |
resume``.

These commands mirror the HTTP API of a running ``keeplink serve``. Options every one of
them takes (after the command name):

``--url URL``
    the gateway (default: ``$KEEPLINK_URL``, else ``http://127.0.0.1:8470``);
``--token TOKEN``
    the bearer token for writes (default: ``$KEEPLINK_TOKEN``);
``--json``
    machine output: the API's JSON, exactly one document on stdout (``send``: the submit
    answer, the command with ``device_presence`` and ``note`` beside its fields; ``send
    --wait``: the command as it ended, or as last seen when the wait timed out);
``--timeout SECONDS``
    how long one HTTP request may take (default 10).

Commands::

    keeplink devices
    keeplink send DEVICE OP [k=v ...] [--key K] [--ttl S] [--max-attempts N]
                  [--priority P] [--idempotency-key I] [--wait] [--wait-timeout S]
    keeplink commands [--device D] [--state S[,S...]] [--limit N]
    keeplink cancel ID      (ID: the id, or a unique prefix of it of at least 6 hex digits)
    keeplink reconnect DEVICE
    keeplink resume DEVICE

``send`` arguments are ``k=v`` pairs; ``v`` is JSON if it parses as JSON (``21.5``,
``true``, ``"x"``, ``{"a":1}``), else the plain string. ``send`` prints the command id and
its state (and says so when the device is away and the command waits for it); with
``--wait`` it follows the gateway's event stream until the command is final (a progress bar
for a firmware transfer on a terminal, plain lines otherwise). ``send DEVICE firmware
path=IMAGE`` fills in ``sha256`` and ``size`` from the file when they are not given (the
gateway reads the image from the same path). A command that could never be delivered (an
op or args the device's driver cannot carry, a firmware image the gateway cannot read) is
refused at once and nothing is stored: exit 1 with the gateway's reason. ``reconnect``
makes a failed link (a refused token, a device that named another id) try again now, or a
link waiting out a backoff skip the rest of the wait, once the device or its config is
fixed. ``resume`` delivers to a device whose deliveries the breaker parked (after repeated
failed delivery cycles) now, instead of at the end of the park.

Exit codes, for scripts:

==  ==========================================================================================
0   ok (``send``: the command is stored; ``send --wait``: it succeeded; ``cancel``: it is
    cancelled; ``reconnect``: the link tries again now, or is already up; ``resume``:
    delivery resumes, or was not parked)
1   the command ended other than succeeded (failed, rejected, expired, cancelled,
    superseded; for ``cancel``: it finished before it could be cancelled), or the gateway
    answered another error
2   bad usage or configuration (options, ``k=v`` arguments, ``--url``; ``cancel``: an id
    prefix that starts more than one command's id, which are listed)
3   the gateway is unreachable (nothing listening, connection reset, no answer in time)
4   authentication failed (401: missing or wrong ``--token``)
5   not found (404: unknown device or command)
6   ``--wait`` timed out (the command is still stored and may yet complete)
130 interrupted (Ctrl-C); a command already sent stays stored
==  ==========================================================================================

Errors go to stderr as ``keeplink: [code] message`` with the API's ``{code, message}``.
"""

from __future__ import annotations

from keeplink.cli_client._common import (
    CLIENT_COMMANDS,
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
)
from keeplink.cli_client._parser import add_client_commands, parse_kv
from keeplink.cli_client._run import INTERRUPT_GRACE_S as INTERRUPT_GRACE_S
from keeplink.cli_client._run import main, run_client, run_client_command

__all__ = [
    "CLIENT_COMMANDS",
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "add_client_commands",
    "main",
    "parse_kv",
    "run_client",
    "run_client_command",
]
