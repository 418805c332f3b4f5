"""Check an arbitrary JSON body against the CDS Hooks 2.0 service-response rules (and Epic's).

Deliberately independent of `cds_service.protocol.cards`: it re-states the rules from the sources so
that tests can catch a bug in the builders. Each problem is a string starting with the JSON path
of the offending element, e.g. `cards[0].suggestions[1].actions[0].description: missing`.
Rule numbers refer to shared/reference/cds-hooks-conformance.md.

Spec: https://cds-hooks.hl7.org/2.0/#cds-service-response
Epic: https://fhir.epic.com/Documentation?docId=cds-hooks ("CDS Hooks Response")
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

INDICATORS = ("info", "warning", "critical")
SELECTION_BEHAVIORS = ("at-most-one", "any")
LINK_TYPES = ("absolute", "smart")
ACTION_TYPES = ("create", "update", "delete")
# FHIR ids are at most 64 characters, but Epic's draft-order ids run to ~194 (Epic tutorial,
# draftOrders with medication references) and a delete suggestion must name them verbatim.
RESOURCE_ID = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,256}$")
EPIC_TOPIC_CODE = re.compile(r"^[A-Za-z0-9]{1,100}$")
EPIC_DETAIL_CONTENT_TYPE = "com.epic.cdshooks.card.detail.content-type"
EPIC_DETAIL_CONTENT_TYPES = (
    "text/markdown",
    "text/markdown; variant=GitHub",
    "text/markdown; variant=CommonMark",
    "text/plain",
    "text/html",
)
HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
# Rule 138: extension keys SHOULD be globally unique, e.g. reverse-domain `com.example.timestamp`.
EXTENSION_KEY = re.compile(r"^[a-z0-9-]+(\.[A-Za-z0-9-]+)+$")

# Attributes defined by 2.0 / 2.0.1; `extension` is reserved for implementation data on any
# object. Anything else is most likely a builder bug (e.g. a snake_case key).
KNOWN_KEYS = {
    "response": {"cards", "systemActions", "extension"},
    "card": {
        "uuid",
        "summary",
        "detail",
        "indicator",
        "source",
        "suggestions",
        "selectionBehavior",
        "overrideReasons",
        "links",
        "extension",
    },
    "source": {"label", "url", "icon", "topic", "extension"},
    "coding": {"code", "system", "display", "extension"},
    "suggestion": {"label", "uuid", "isRecommended", "actions", "extension"},
    "action": {"type", "description", "resource", "resourceId", "extension"},
    "link": {"label", "url", "type", "appContext", "autolaunchable", "extension"},
}


def _at(path: str, *keys: str | int) -> str:
    for key in keys:
        if isinstance(key, int):
            path = f"{path}[{key}]"
        else:
            path = f"{path}.{key}" if path else key
    return path


def _empty_values(value: object, path: str, *, top: bool = False) -> list[str]:
    """Rules 2-5: no null, no empty or blank string, no empty array or object."""
    if value is None:
        return [f"{path}: null (rule 2: omit the element instead)"]
    if isinstance(value, str):
        return [] if value.strip() else [f"{path}: empty or blank string (rules 3, 5)"]
    problems = []
    if isinstance(value, dict):
        for key, item in value.items():
            if top and key == "cards" and item == []:
                continue  # `"cards": []` is the one empty array the spec asks for
            problems += _empty_values(item, _at(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += _empty_values(item, _at(path, i))
    if isinstance(value, list | dict) and not value:
        kind = "array" if isinstance(value, list) else "object"
        problems.append(f"{path or 'response'}: empty {kind} (rule 3)")
    return problems


def _object(value: object, path: str, kind: str) -> tuple[dict | None, list[str]]:
    if not isinstance(value, dict):
        return None, [f"{path or 'response'}: must be a JSON object ({kind})"]
    unknown = sorted(set(value) - KNOWN_KEYS[kind])
    return value, [f"{_at(path, k)}: unknown {kind} attribute" for k in unknown]


def _list(obj: dict, key: str) -> list:
    """The array at `key`, or [] when absent or not an array (`_types` reports the latter)."""
    value = obj.get(key, [])
    return value if isinstance(value, list) else []


_JSON_TYPE = {str: "a string", bool: "a boolean", list: "an array", dict: "an object"}


def _types(obj: dict, path: str, required: dict[str, type], optional: dict[str, type]) -> list:
    """Missing REQUIRED keys and wrongly typed values; `object` means "checked elsewhere"."""
    problems = []
    for key in required:
        if key not in obj:
            problems.append(f"{_at(path, key)}: missing (REQUIRED)")
    for key, kind in {**required, **optional}.items():
        if key in obj and obj[key] is not None and not isinstance(obj[key], kind):
            problems.append(f"{_at(path, key)}: must be {_JSON_TYPE[kind]}")
    return problems


def _http_url(obj: dict, key: str, path: str) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        return []
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return [f"{_at(path, key)}: {value!r} is not an absolute http(s) URL"]
    return []


def _coding(value: object, path: str, *, display_required: bool = False) -> list[str]:
    coding, problems = _object(value, path, "coding")
    if coding is None:
        return problems
    required = {"code": str, "system": str} | ({"display": str} if display_required else {})
    return problems + _types(coding, path, required, {"display": str})


def _action(value: object, path: str) -> list[str]:
    action, problems = _object(value, path, "action")
    if action is None:
        return problems
    problems += _types(action, path, {"type": str, "description": str}, {"resourceId": str})
    kind = action.get("type")
    if isinstance(kind, str) and kind not in ACTION_TYPES:
        problems.append(f"{_at(path, 'type')}: {kind!r} is not one of {', '.join(ACTION_TYPES)}")
    resource = action.get("resource")
    if kind in ("create", "update"):
        if resource is None:
            problems.append(f"{_at(path, 'resource')}: missing ({kind} needs a FHIR resource)")
        elif not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            problems.append(f"{_at(path, 'resource')}: must be a FHIR resource with resourceType")
    elif kind == "delete":
        if isinstance(resource, str):
            problems.append(
                f"{_at(path, 'resource')}: an id string in resource is the "
                f"deprecated 1.0 delete form; use resourceId"
            )
        elif resource is not None:
            problems.append(
                f"{_at(path, 'resource')}: delete must not carry a resource (cds-resp-2)"
            )
        if "resourceId" not in action:
            problems.append(
                f"{_at(path, 'resourceId')}: missing (delete SHOULD name it, cds-resp-2)"
            )
    resource_id = action.get("resourceId")
    if isinstance(resource_id, str) and resource_id.strip() and not RESOURCE_ID.match(resource_id):
        problems.append(
            f"{_at(path, 'resourceId')}: {resource_id!r} is not a relative reference Type/id"
        )
    return problems


def _link(value: object, path: str) -> list[str]:
    link, problems = _object(value, path, "link")
    if link is None:
        return problems
    problems += _types(
        link,
        path,
        {"label": str, "url": str, "type": str},
        {"appContext": str, "autolaunchable": bool},
    )
    problems += _http_url(link, "url", path)
    kind = link.get("type")
    if isinstance(kind, str) and kind not in LINK_TYPES:
        problems.append(f"{_at(path, 'type')}: {kind!r} is not one of {', '.join(LINK_TYPES)}")
    if "appContext" in link and kind != "smart":
        problems.append(f"{_at(path, 'appContext')}: only valid on smart links (cds-resp-3)")
    return problems


def _suggestion(value: object, path: str, epic: bool) -> list[str]:
    suggestion, problems = _object(value, path, "suggestion")
    if suggestion is None:
        return problems
    problems += _types(
        suggestion, path, {"label": str}, {"uuid": str, "isRecommended": bool, "actions": list}
    )
    if epic and "uuid" not in suggestion:
        problems.append(f"{_at(path, 'uuid')}: missing (Epic sends feedback only with a uuid)")
    actions = _list(suggestion, "actions")
    for i, action in enumerate(actions):
        problems += _action(action, _at(path, "actions", i))
    # Epic: "only a single action per suggestion".
    if epic and len(actions) != 1:
        problems.append(
            f"{_at(path, 'actions')}: Epic needs exactly one action, found {len(actions)}"
        )
    return problems


def _source(value: object, path: str, epic: bool) -> list[str]:
    source, problems = _object(value, path, "source")
    if source is None:
        return problems
    problems += _types(source, path, {"label": str}, {"url": str, "icon": str})
    problems += _http_url(source, "url", path) + _http_url(source, "icon", path)
    if "topic" in source:
        topic_path = _at(path, "topic")
        problems += _coding(source["topic"], topic_path)
        code = source["topic"].get("code") if isinstance(source["topic"], dict) else None
        # Epic: topic code "alphanumeric only, max 100 characters" (overrides are keyed on it).
        if epic and isinstance(code, str) and not EPIC_TOPIC_CODE.match(code):
            problems.append(
                f"{_at(topic_path, 'code')}: {code!r} must be 1-100 alphanumeric "
                f"characters for Epic"
            )
    return problems


def _card(value: object, path: str, epic: bool) -> list[str]:
    card, problems = _object(value, path, "card")
    if card is None:
        return problems
    problems += _types(
        card,
        path,
        {"summary": str, "indicator": str, "source": object},
        {
            "uuid": str,
            "detail": str,
            "suggestions": list,
            "selectionBehavior": str,
            "overrideReasons": list,
            "links": list,
            "extension": dict,
        },
    )
    if epic and "uuid" not in card:
        problems.append(f"{_at(path, 'uuid')}: missing (Epic sends feedback only with a uuid)")
    summary = card.get("summary")
    if isinstance(summary, str) and len(summary) >= 140:
        problems.append(f"{_at(path, 'summary')}: {len(summary)} characters; must be <140")
    indicator = card.get("indicator")
    if isinstance(indicator, str) and indicator not in INDICATORS:
        problems.append(
            f"{_at(path, 'indicator')}: {indicator!r} is not one of {', '.join(INDICATORS)}"
        )
    if "source" in card:
        problems += _source(card["source"], _at(path, "source"), epic)

    suggestions = _list(card, "suggestions")
    for i, suggestion in enumerate(suggestions):
        problems += _suggestion(suggestion, _at(path, "suggestions", i), epic)
    behavior = card.get("selectionBehavior")
    behavior_path = _at(path, "selectionBehavior")
    if suggestions and behavior is None:
        problems.append(f"{behavior_path}: missing (MUST be present with suggestions, rule 77)")
    if isinstance(behavior, str) and behavior not in SELECTION_BEHAVIORS:
        problems.append(
            f"{behavior_path}: {behavior!r} is not one of {', '.join(SELECTION_BEHAVIORS)}"
        )
    recommended = sum(
        1 for s in suggestions if isinstance(s, dict) and s.get("isRecommended") is True
    )
    if behavior == "at-most-one" and recommended > 1:
        problems.append(
            f"{behavior_path}: at-most-one with {recommended} recommended suggestions (cds-resp-1)"
        )
    # Epic: selectionBehavior "only any is supported".
    if epic and suggestions and isinstance(behavior, str) and behavior != "any":
        problems.append(f"{behavior_path}: Epic supports only 'any', got {behavior!r}")

    for i, reason in enumerate(_list(card, "overrideReasons")):
        problems += _coding(reason, _at(path, "overrideReasons", i), display_required=True)
    for i, link in enumerate(_list(card, "links")):
        problems += _link(link, _at(path, "links", i))

    detail = card.get("detail")
    extension = card.get("extension") if isinstance(card.get("extension"), dict) else {}
    content_type = extension.get(EPIC_DETAIL_CONTENT_TYPE)
    if epic and content_type is not None and content_type not in EPIC_DETAIL_CONTENT_TYPES:
        problems.append(
            f"{_at(path, 'extension', EPIC_DETAIL_CONTENT_TYPE)}: "
            f"{content_type!r} is not a content type Epic supports"
        )
    # Epic renders detail as GitHub Flavored Markdown unless the card declares text/html.
    if epic and isinstance(detail, str) and HTML_TAG.search(detail) and content_type != "text/html":
        problems.append(
            f"{_at(path, 'detail')}: contains HTML tags but extension "
            f"{EPIC_DETAIL_CONTENT_TYPE} is not 'text/html'"
        )
    return problems


def _uuids(cards: list) -> list[str]:
    """Feedback names cards and suggestions by uuid, so they must be unique (rules 68, 83)."""
    seen: dict[str, str] = {}
    problems = []
    for i, card in enumerate(cards):
        if not isinstance(card, dict):
            continue
        path = _at("cards", i)
        owners = [(card.get("uuid"), _at(path, "uuid"))]
        for j, suggestion in enumerate(_list(card, "suggestions")):
            if isinstance(suggestion, dict):
                owners.append((suggestion.get("uuid"), _at(path, "suggestions", j, "uuid")))
        for uuid, where in owners:
            if not isinstance(uuid, str):
                continue
            if uuid in seen:
                problems.append(f"{where}: duplicate uuid {uuid!r} (also at {seen[uuid]})")
            else:
                seen[uuid] = where
    return problems


def validate_response(body: object, *, epic: bool = False) -> list[str]:
    """Every way `body` breaks the CDS Hooks 2.0 response rules (and Epic's, if `epic`)."""
    response, problems = _object(body, "", "response")
    if response is None:
        return problems
    problems += _empty_values(response, "", top=True)
    if "cards" not in response:
        return [*problems, "cards: missing (REQUIRED, rule 65)"]
    cards = response["cards"]
    if not isinstance(cards, list):
        return [*problems, "cards: must be an array"]
    for i, card in enumerate(cards):
        problems += _card(card, _at("cards", i), epic)
    problems += _uuids(cards)
    if "systemActions" in response:
        actions = response["systemActions"]
        if not isinstance(actions, list):
            problems.append("systemActions: must be an array")
        else:
            for i, action in enumerate(actions):
                problems += _action(action, _at("systemActions", i))
    extension = response.get("extension")
    if "extension" in response and not isinstance(extension, dict):
        problems.append("extension: must be a JSON object (rule 137)")
    elif isinstance(extension, dict):
        problems += [f"{_at('extension', key)}: not a reverse-domain name (rule 138)"
                     for key in extension if not EXTENSION_KEY.match(key)]
    return problems


def validate_action(obj: object, path: str = "action") -> list[str]:
    """Problems with one Action (a suggestion action or a system action) found at `path`."""
    return _empty_values(obj, path) + _action(obj, path)
