"""What the client commands print: JSON documents, errors on stderr, plain tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from keeplink.cli_client._common import ERROR_WIDTH


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False), flush=True)


def print_error(code: str, message: str) -> None:
    print(f"keeplink: [{code}] {message}", file=sys.stderr, flush=True)


def truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip(), file=out)
    out.flush()


def error_cell(error: Any) -> str:
    if not isinstance(error, dict):
        return "-"
    return truncate(f"{error.get('code')}: {error.get('message', '')}", ERROR_WIDTH)


def seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}s"
