"""Set `services.<id>.model` / `shadow_model` in a site file by editing those lines only, so the
file an integration engineer reviews keeps its comments, order and quoting, and the change is a
one- or two-line diff.

PyYAML cannot write comments back, and a round trip through it would reflow the whole file.
Instead the block-style lines are located by indentation and rewritten; the result is then
parsed and compared with the original: it must be the same document but for the keys set, or
nothing is written. A layout this editor does not understand (the service written in flow
style with content, anchors, several documents) is refused with a message asking for a hand
edit, never guessed at.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cds_service.config import ConfigError

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")
_COMMENT = re.compile(r"^(?P<value>.*?)(?P<comment>\s+#.*)?$")
_MODEL_VALUE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _meaningful(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block of lines more indented than `indent` following `start`."""
    end = start + 1
    last = start
    while end < len(lines):
        if _meaningful(lines[end]):
            if _indent(lines[end]) <= indent:
                break
            last = end
        end += 1
    return last + 1


def _find(lines: list[str], key: str, start: int, stop: int, indent: int | None) -> int | None:
    for n in range(start, stop):
        match = _KEY.match(lines[n])
        if match and match["key"] == key and (indent is None or len(match["indent"]) == indent):
            return n
    return None


def _child_indent(lines: list[str], start: int, stop: int, parent: int) -> int | None:
    return next((_indent(lines[n]) for n in range(start + 1, stop)
                 if _meaningful(lines[n]) and _indent(lines[n]) > parent), None)


def edit_service_models(text: str, service_id: str, values: Mapping[str, str], where: str
                        ) -> str:
    """`text` with `services.<service_id>.<key>: <value>` for each of `values` (keys `model`,
    `shadow_model`). ConfigError when the layout is not one this editor can change safely."""
    for key, value in values.items():
        if key not in ("model", "shadow_model") or not _MODEL_VALUE.match(value):
            raise ConfigError(f"{where}: cannot set {key}: {value!r}")
    original = yaml.safe_load(text)
    if not isinstance(original, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    hand = f"{where}: edit services.{service_id} by hand ({{why}}), then run check-config"
    lines = text.splitlines(keepends=True)
    services = _find(lines, "services", 0, len(lines), 0)
    if services is None:
        # Without `services:` every registered service is on; writing one would turn the
        # others off.
        raise ConfigError(hand.format(why="the file has no `services:` block"))
    if _COMMENT.match(_KEY.match(lines[services])["rest"])["value"].strip():
        raise ConfigError(hand.format(why="`services:` is not written in block style"))
    end = _block_end(lines, services, 0)
    indent = _child_indent(lines, services, end, 0) or 2
    entry = _find(lines, service_id, services + 1, end, indent)
    if entry is None:  # not listed: the service is off at this site
        raise ConfigError(hand.format(why=f"services.{service_id} is not listed"))
    parts = _COMMENT.match(_KEY.match(lines[entry])["rest"].rstrip("\n"))
    body = parts["value"].strip()
    if body == "{}":  # `kidney-risk: {}`: the service on defaults, now given keys
        newline = "\n" if lines[entry].endswith("\n") else ""
        lines[entry] = f"{' ' * indent}{service_id}:{parts['comment'] or ''}{newline}"
    elif body:
        raise ConfigError(hand.format(why=f"services.{service_id} is not in block style"))
    stop = _block_end(lines, entry, indent)
    child = _child_indent(lines, entry, stop, indent) or indent + 2
    for key, value in values.items():
        at = _find(lines, key, entry + 1, stop, child)
        if at is None:
            lines.insert(entry + 1, f"{' ' * child}{key}: {value}\n")
            stop += 1
            continue
        old = _COMMENT.match(_KEY.match(lines[at])["rest"].rstrip("\n"))
        newline = "\n" if lines[at].endswith("\n") else ""
        lines[at] = f"{' ' * child}{key}: {value}{old['comment'] or ''}{newline}"
    edited = "".join(lines)
    _check_only(original, yaml.safe_load(edited), service_id, values, hand)
    return edited


def _check_only(before: dict, after: Any, service_id: str, values: Mapping[str, str],
                hand: str) -> None:
    expected = copy.deepcopy(before)
    entry = expected["services"][service_id]
    if entry is None:  # `kidney-risk:` with nothing under it
        entry = expected["services"][service_id] = {}
    entry.update(values)
    if after != expected:
        raise ConfigError(hand.format(why="an edit by line would change more than the model "
                                          "keys"))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, keeping its permissions: a reload or a reader
    never sees half a file."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
