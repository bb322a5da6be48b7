"""The documentation keeps up with the code.

- Every key the gateway's config parser accepts (``[gateway]``, ``[[devices]]``, a device's
  ``backoff`` table and each driver's ``options``) has a row in ``docs/gateway.md``, and
  each option's declared default is the one its row gives. The keys are read from the
  parser's own declarations and the driver registry's, never from a list copied here.
- Every frame type the jsonline decoder dispatches on has a section in
  ``docs/protocol.md``. The types are read from the decoder's source.
- The error-code table in ``docs/protocol.md`` says of each code what the code does with
  it: the reconnect class of a refused ``hello`` (``error_class_of``) and whether a refusing
  ``ack`` is retried (``RETRYABLE_REJECTIONS``).
- Nothing in ``docs/``, ``README.md`` or ``src/`` points outside the repository: no
  references to documents it does not contain, no links that do not resolve inside it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from keeplink._core.dispatch import RETRYABLE_REJECTIONS
from keeplink._core.errors import ConfigError, ErrorClass, ErrorCode, error_class_of
from keeplink.gateway import config
from keeplink.gateway.drivers import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODEC = ROOT / "src" / "keeplink" / "_core" / "jsonline.py"

_HEADING = re.compile(r"^(#+)\s+(.*)$")
_CODE = re.compile(r"`([^`]+)`")


def _sections(path: Path) -> list[tuple[str, str]]:
    """``(heading, body)`` for every heading of a Markdown file (outside code fences)."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            sections.append((match.group(2), []))
        else:
            sections[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in sections]


def _row_keys(body: str) -> set[str]:
    """The names in backticks in the first cell of each table row of ``body``."""
    keys: set[str] = set()
    for line in body.splitlines():
        if line.startswith("|") and line.count("|") >= 3:
            keys.update(_CODE.findall(line.split("|")[1]))
    return keys


def _documented(headings: tuple[str, ...]) -> set[str]:
    """Keys with a table row in the sections of docs/gateway.md whose heading has any of
    ``headings`` in it."""
    keys: set[str] = set()
    for heading, body in _sections(DOCS / "gateway.md"):
        if any(h in heading for h in headings):
            keys |= _row_keys(body)
    return keys


def _driver_heading(driver: str) -> str:
    return f'`driver = "{driver}"`'


DEVICE_HEADINGS = ("`[[devices]]`", *(_driver_heading(d) for d in REGISTRY))


# ---------------------------------------------------------------------------- config keys


def test_the_declared_keys_are_what_the_parser_accepts() -> None:
    """The declarations are the parser's own: its refusal of an unknown key lists them."""
    device = {"id": "d", "driver": "jsonline", "port": 1}
    for data, keys in (
        ({"gateway": {"zz": 1}}, config.GATEWAY_KEYS),
        ({"devices": [{**device, "zz": 1}]}, config.DEVICE_KEYS),
        ({"devices": [{**device, "backoff": {"zz": 1}}]}, config.BACKOFF_KEYS),
    ):
        with pytest.raises(ConfigError) as refused:
            config.parse_config(data)
        assert refused.value.message.endswith("expected one of " + ", ".join(sorted(keys)))


def test_every_gateway_key_is_documented() -> None:
    missing = sorted(config.GATEWAY_KEYS - _documented(("`[gateway]`",)))
    assert not missing, f"docs/gateway.md has no row for [gateway] keys {missing}"


def test_every_device_key_is_documented() -> None:
    missing = sorted(config.DEVICE_KEYS - _documented(DEVICE_HEADINGS))
    assert not missing, f"docs/gateway.md has no row for [[devices]] keys {missing}"


def test_every_backoff_key_is_documented() -> None:
    documented = _documented(DEVICE_HEADINGS)
    missing = sorted(k for k in config.BACKOFF_KEYS if f"backoff.{k}" not in documented)
    assert not missing, f"docs/gateway.md has no row for backoff keys {missing}"


def test_the_config_parser_takes_the_registrys_drivers() -> None:
    assert tuple(REGISTRY) == config.DRIVERS
    with pytest.raises(ConfigError) as refused:
        config.parse_config({"devices": [{"id": "d", "driver": "zz", "port": 1}]})
    assert refused.value.message.endswith(f"must be one of {', '.join(REGISTRY)}, got 'zz'")


@pytest.mark.parametrize("driver", REGISTRY)
def test_every_driver_option_is_documented(driver: str) -> None:
    heading = _driver_heading(driver)
    assert any(heading in h for h, _ in _sections(DOCS / "gateway.md")), (
        f"docs/gateway.md has no section headed {heading}"
    )
    documented = _documented((heading,))
    options = REGISTRY[driver].options.model_fields
    missing = sorted(k for k in options if f"options.{k}" not in documented)
    assert not missing, f"docs/gateway.md's {heading} section has no row for options {missing}"


def _default_cells(heading: str) -> dict[str, str]:
    """Key -> the default cell of its row, in the section of docs/gateway.md so headed."""
    cells: dict[str, str] = {}
    for section, body in _sections(DOCS / "gateway.md"):
        if heading not in section:
            continue
        for line in body.splitlines():
            parts = line.split("|")
            if line.startswith("|") and len(parts) >= 5:
                for key in _CODE.findall(parts[1]):
                    cells[key] = parts[3].strip()
    return cells


@pytest.mark.parametrize("driver", REGISTRY)
def test_every_driver_option_default_is_the_documented_one(driver: str) -> None:
    """A declared default (None: the option is unset, which the row describes in words)
    is what the option's row says, in backticks: ``"{device}/cmd"``, ``30``, ``10``."""
    cells = _default_cells(_driver_heading(driver))
    for key, field in REGISTRY[driver].options.model_fields.items():
        if field.default is None:
            continue
        shown = f'"{field.default}"' if isinstance(field.default, str) else f"{field.default:g}"
        assert cells.get(f"options.{key}") == f"`{shown}`", (driver, key, cells.get(key))


# ---------------------------------------------------------------------------- frame types


def decoded_frame_types() -> set[str]:
    """The frame type names the decoder dispatches on: the strings ``_parse`` compares
    the frame's ``t`` (its local ``kind``) with."""
    tree = ast.parse(CODEC.read_text("utf-8"))
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    parse = next(node for node in functions if node.name == "_parse")
    names: set[str] = set()
    for node in ast.walk(parse):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name):
            if node.left.id != "kind":
                continue
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, ast.Eq) and isinstance(right, ast.Constant):
                    names.add(str(right.value))
    return names


def test_the_frame_types_are_found_in_the_decoder() -> None:
    assert {"hello", "welcome", "req", "ack"} <= decoded_frame_types()


def test_every_frame_type_is_documented() -> None:
    headed: set[str] = set()
    for heading, _ in _sections(DOCS / "protocol.md"):
        headed.update(_CODE.findall(heading))
    missing = sorted(decoded_frame_types() - headed)
    assert not missing, f"docs/protocol.md has no section headed with frame types {missing}"


# ---------------------------------------------------------------------------- references

OUTSIDE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a section sign (a reference into another document)", re.compile("§")),
    ("a design document the repository does not have", re.compile(r"\bDESIGN\b")),
    ("a path to a shared folder outside the repository", re.compile(r"\.\./shared")),
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _scanned() -> list[Path]:
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    files += sorted(p for p in (ROOT / "src").rglob("*") if p.suffix in (".py", ".html", ".md"))
    return files


def test_nothing_refers_outside_the_repository() -> None:
    found = []
    for path in _scanned():
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            for what, pattern in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


def _anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    anchors: set[str] = set()
    for heading, _ in _sections(path)[1:]:
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_every_relative_link_resolves_inside_the_repository() -> None:
    broken = []
    for path in _scanned():
        if path.suffix != ".md":
            continue
        for target in _LINK.findall(path.read_text("utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "links that do not resolve inside the repository:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------- error codes

_CLASS_WORDS = {
    "terminal": ErrorClass.TERMINAL,
    "resource exhausted": ErrorClass.RESOURCE_EXHAUSTED,
    "absent": ErrorClass.ABSENT,
    "transient": ErrorClass.TRANSIENT,
}


def _error_code_rows() -> dict[str, tuple[str, str]]:
    """``code -> (as a refused hello, in a refusing ack)`` from docs/protocol.md's table."""
    rows: dict[str, tuple[str, str]] = {}
    lines = (DOCS / "protocol.md").read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| code | meaning |"))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("`"):  # not "*anything else*": a device's own code
            rows[cells[0].strip("`")] = (cells[-2], cells[-1])
    return rows


def test_the_error_code_table_says_what_the_code_does() -> None:
    rows = _error_code_rows()
    assert sorted(rows) == sorted(code.value for code in ErrorCode)
    for code in ErrorCode:
        hello, ack = rows[code.value]
        word = next(w for w in _CLASS_WORDS if hello.startswith(w))
        assert _CLASS_WORDS[word] is error_class_of(code), code
        assert ack == ("retried" if code.value in RETRYABLE_REJECTIONS else "rejected"), code
