"""JSON from outside (request bodies, FHIR server answers) with a nesting limit.

Python's json module recurses once per nesting level: a body such as `[` * 100000 raises
RecursionError, not a ValueError, and one nested a little less than the interpreter's recursion
limit parses but can exhaust the stack later, in whatever walks it next (validation, json.dumps
for a log line). `loads` answers `JsonTooDeep` for both, right after parsing, so nothing further
down ever sees such a value.

Parsing is msgspec's (its untyped decode builds the same dicts, lists, strings and numbers as
`json.loads`, about 1.8 times as fast: a 1 MB prefetch in 9.6 ms against 17.4 on the benchmark
machine, issue 20). msgspec is strict RFC 8259 UTF-8; what it refuses is parsed again by
`json.loads`, so every input gets exactly the standard library's answer: its value (`NaN`, a lone
surrogate escape, `1e400` as infinity, UTF-16 bytes, a UTF-8 BOM on bytes) or its exception.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from cds_service.protocol.errors import CdsError, Issue

# Objects and arrays, counted from the outermost. The deepest JSON this service expects is a
# CDS Hooks request whose prefetch Bundle carries a resource with extensions on a coding, about
# 15 levels (request > prefetch > Bundle > entry > [] > resource > code > coding > [] > extension
# > [] > ...); 100 leaves room for FHIR's deepest shapes (nested Questionnaire items, extensions on
# extensions) and stays far below the ~1000 levels at which Python runs out of stack.
MAX_DEPTH = 100


class JsonTooDeep(CdsError):
    """JSON nested deeper than `MAX_DEPTH` objects and arrays."""

    # Refused before anything walks the body: a RecursionError there would be a 500.
    status = 400
    code = "too-long"

    def __init__(self, limit: int = MAX_DEPTH):
        message = f"JSON nested deeper than {limit} levels"
        super().__init__(message, issues=[
            Issue(f"request body: {message}; not processed.", code=self.code)])
        self.limit = limit


def loads(data: str | bytes, *, limit: int = MAX_DEPTH, utf8: bytes | None = None,
          **kwargs: Any) -> Any:
    """`json.loads`, raising `JsonTooDeep` for a value nested deeper than `limit`. `utf8`: the
    UTF-8 bytes `data` was decoded from, when the caller has them (the depth is read from them
    without encoding `data` again)."""
    try:
        value = json.loads(data, **kwargs) if kwargs else _decode(data, utf8)
    except RecursionError:
        raise JsonTooDeep(limit) from None
    if isinstance(value, (dict, list)) and text_too_deep(data if utf8 is None else utf8, limit):
        raise JsonTooDeep(limit)
    return value


_DECODER = msgspec.json.Decoder()


def _decode(data: str | bytes, utf8: bytes | None) -> Any:
    try:
        return _DECODER.decode(data if utf8 is None else utf8)
    except (msgspec.MsgspecError, UnicodeError):
        return json.loads(data)


# Every byte but the five that shape JSON's nesting (a `bytes.translate` delete set).
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')
_AS_PARENS = bytes.maketrans(b"[]{}", b"()()")


def text_too_deep(text: str | bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the value `text` parses to nests objects and arrays more than `limit` deep, read
    from the text: `text` must be JSON that `json.loads` accepted. A few C-speed passes over
    bytes instead of a Python visit of every object and array (a 1 MB prefetch: about 2-4 ms
    against 10-17).

    RFC 8259 §7: a quote or backslash inside a string is escaped, and escapes read left to
    right, so removing every `\\` and then every `\"` leaves one unescaped `"` at each end of each
    string. Of those quotes and the brackets, two adjacent quotes enclose nothing: dropping them
    keeps every other quote's parity, so the odd stretches between the quotes left are string
    contents (brackets there are text) and the even ones are structure. Each round of removing
    `()` then strips exactly the innermost level, so the depth is the number of rounds."""
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif (encoding := json.detect_encoding(text)).startswith("utf-8"):
        data = bytes(text)  # UTF-8 codes every non-ASCII character in bytes 0x80 and above
    else:  # json.loads reads UTF-16 and UTF-32 bytes too, where `"` can be half a character
        data = text.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = data.translate(None, _NOT_STRUCTURE)  # counted here: a tenth of the bytes to read
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # every level opens with one of them: at most this many levels
    data = data.replace(b'""', b"")
    if b'"' in data:
        data = b"".join(data.split(b'"')[::2])
    data = data.translate(_AS_PARENS)
    for _ in range(limit):
        if not data:
            return False
        data = data.replace(b"()", b"")
    return bool(data)
