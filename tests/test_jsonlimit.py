"""The nesting limit on JSON from outside: `jsonlimit.text_too_deep` reads the depth from the
text and must agree with `too_deep`, the plain walk of the parsed value, on every JSON shape."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.data import jsonlimit
from cds_service.data.jsonlimit import MAX_DEPTH, JsonTooDeep, text_too_deep

# Strings that look like structure: brackets, quotes and backslashes in every arrangement that
# an escape-unaware scan would miscount.
TRICKY = ["", "[", "]", "{", "}", "[[[", "]]]}", '"', '\\', '\\"', '"\\', '\\\\"', '[\\"]',
          '""', '"[', ']"', "\\\\", "a\\", "\\n[", "\u00e9[", "\u2028{", "\U0001f600]",
          "\u225b\u5b22", "x" * 50]


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """The oracle: the parsed value walked level by level (what the service did before)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def nested(depth: int, leaf: object = 1, rng: random.Random | None = None) -> object:
    """`depth` levels of objects and arrays (a leaf that is a container adds its own)."""
    value = leaf
    for level in range(depth):
        if rng is None or rng.random() < 0.5:
            value = [value] if rng is None else [rng.choice(TRICKY), value, rng.choice(TRICKY)]
        else:
            value = {rng.choice(TRICKY): value, "k" + str(level): rng.choice(TRICKY)}
    return value


def random_value(rng: random.Random, depth: int) -> object:
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice([*TRICKY, 0, -1.5, True, None, 10**30])
    if rng.random() < 0.5:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(TRICKY) + str(i): random_value(rng, depth - 1)
            for i in range(rng.randint(0, 3))}


def encodings(value: object) -> list[str | bytes]:
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return [compact, json.dumps(value), json.dumps(value, indent=2, ensure_ascii=False),
            compact.encode("utf-8"), compact.encode("utf-16-le"),
            compact.encode("utf-32")]


@pytest.mark.parametrize("depth", [0, 1, 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 150])
def test_depth_exactly_at_the_limit(depth):
    # `[` * d + `]` * d nests d arrays: over the limit exactly when d > MAX_DEPTH.
    text = "[" * depth + "]" * depth if depth else "1"
    assert text_too_deep(text) is (depth > MAX_DEPTH)
    assert too_deep(json.loads(text)) is (depth > MAX_DEPTH)


def test_brackets_inside_strings_are_text():
    text = json.dumps({"div": "[" * 500 + "{" * 500, "q": '\\"[[[', "e": "\\\\" + "[" * 300})
    assert not text_too_deep(text)
    assert not text_too_deep('["\\\\", "\\\\\\"[[[[", []]', limit=2)
    assert not text_too_deep('["\ud800[[", "\udfff"]', limit=1)  # lone surrogates, as Python reads
    # Two levels plus a string of brackets: over a limit of 1, not of 2.
    assert text_too_deep('[{"a": "]]]]"}]', limit=1)
    assert not text_too_deep('[{"a": "]]]]"}]', limit=2)


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_the_walk_of_the_parsed_value(seed):
    rng = random.Random(seed)  # noqa: S311 - reproducible test shapes, not secrets
    for _ in range(25):
        value = random_value(rng, rng.randint(0, 6))
        limit = rng.randint(1, 7)
        for text in encodings(value):
            assert text_too_deep(text, limit) is too_deep(value, limit), (text, limit)


@pytest.mark.parametrize("seed", range(10))
def test_agrees_near_the_service_limit(seed):
    rng = random.Random(seed)  # noqa: S311 - reproducible test shapes, not secrets
    for depth in (MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
        value = nested(depth, random_value(rng, 2), rng)
        for text in encodings(value):
            assert text_too_deep(text) is too_deep(value), depth


def test_loads_refuses_too_deep_and_returns_the_rest():
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert jsonlimit.loads(ok) == json.loads(ok)
    with pytest.raises(JsonTooDeep):
        jsonlimit.loads("[" + ok + "]")
    with pytest.raises(JsonTooDeep):  # deeper than Python's own recursion limit
        jsonlimit.loads("[" * 100_000 + "]" * 100_000)
    assert jsonlimit.loads('"[[["') == "[[["


def test_loads_reads_the_depth_from_the_utf8_bytes_given():
    deep = "[" * (MAX_DEPTH + 1) + '"é"' + "]" * (MAX_DEPTH + 1)
    with pytest.raises(JsonTooDeep):
        jsonlimit.loads(deep, utf8=deep.encode("utf-8"))
    shallow = '{"a": ["é", {"b": "[[[[["}]}'
    assert jsonlimit.loads(shallow, utf8=shallow.encode("utf-8"), limit=3) == json.loads(shallow)
    with pytest.raises(JsonTooDeep):
        jsonlimit.loads(shallow, utf8=shallow.encode("utf-8"), limit=2)


# --- parsing: msgspec where it can, the standard library's answer always --------------------

def outcome(parse, text) -> tuple:
    """What parsing `text` gives: the value, typed all the way down (1 and 1.0 and True differ;
    NaN compares by repr), or the exception's type."""
    try:
        value = parse(text)
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return ("error", type(exc))
    return ("value", typed(value))


def typed(value: object) -> object:
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, repr(value))


# Texts where msgspec and `json.loads` part ways, or where either refuses: each must get the
# standard library's answer.
EDGES = ["NaN", "[Infinity, -Infinity]", "1e400", "-1e400", "-0", "-0.0", "1.5e-400",
         "12345678901234567890123", "1" * 4300, "1" * 4301, "1." + "1" * 5000,
         '{"a": 1, "a": 2}', '"\\ud800"', '{"\\udfff": 1}', '"\\uD834\\uDD1E"', '"a\x01b"',
         '"\t"', '"\\u0000"', " [1] \n", "\ufeff[1]", "[1,]", "01", "tru", "", " ", '"\\x"',
         "[1 2]", '"\\u12"', "4.9e-324", "2.2250738585072014e-308", "1.7976931348623157e308",
         "0.1", "1E2", "1e-7", '["\\/"]', "[" * 50 + "]" * 50, "[" * 5000 + "]" * 5000]
EDGE_BYTES = [b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b"\xef\xbb\xbf[1]", b"[1]\x00",
              '{"a": "é"}'.encode("utf-16"), '{"a": "é"}'.encode("utf-32-le"),
              '{"a": "é"}'.encode()]


def stdlib(text):
    value = json.loads(text)
    if isinstance(value, (dict, list)) and too_deep(value):
        raise JsonTooDeep()
    return value


@pytest.mark.parametrize("text", EDGES + EDGE_BYTES, ids=repr)
def test_loads_answers_as_the_standard_library_at_the_edges(text):
    expected = outcome(stdlib, text)
    if expected[1] is RecursionError:
        expected = ("error", JsonTooDeep)
    assert outcome(jsonlimit.loads, text) == expected
    if isinstance(text, str) and "\ud800" not in text:
        utf8 = text.encode("utf-8", "surrogatepass")
        assert outcome(lambda t: jsonlimit.loads(t, utf8=utf8), text) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.integers(min_value=-(10**40), max_value=10**40) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(value=json_values, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_loads_equals_the_standard_library_on_any_json(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert outcome(jsonlimit.loads, text) == outcome(stdlib, text)
    utf8 = text.encode("utf-8", "surrogatepass")
    assert outcome(lambda t: jsonlimit.loads(t, utf8=utf8), text) == outcome(stdlib, text)
    assert outcome(jsonlimit.loads, utf8) == outcome(stdlib, utf8)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(value=json_values, cut=st.integers(min_value=0), insert=st.sampled_from(
    ["", ",", "]", "}", '"', "\\", "NaN", "\x00", "\ud800", "\ufeff", " ", "e9", "-", "."]))
def test_loads_equals_the_standard_library_on_broken_json(value, cut, insert):
    text = json.dumps(value, ensure_ascii=False)
    at = cut % (len(text) + 1)
    broken = text[:at] + insert + text[at:]
    assert outcome(jsonlimit.loads, broken) == outcome(stdlib, broken)
