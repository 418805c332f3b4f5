"""CDS Hooks 2.0 response builders: a card that breaks the spec cannot be constructed.

Every class is a frozen dataclass checked in `__post_init__`; a bad argument is a programming
error and raises `ValueError`. `to_dict()` emits CDS Hooks JSON with every unset attribute
omitted, because the spec forbids nulls and empty strings, arrays and objects (rules 2-4).
`render_response` adds the rules that concern the whole response and, for Epic, Epic's limits.

Spec: https://cds-hooks.hl7.org/2.0/#cds-service-response
Epic: https://fhir.epic.com/Documentation?docId=cds-hooks ("CDS Hooks Response")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cds_service.ids import uuid4_text
from cds_service.protocol.errors import ServiceFault

INDICATORS = frozenset({"info", "warning", "critical"})
# Least to most urgent; None is "no card".
_SEVERITY = (None, "info", "warning", "critical")
SELECTION_BEHAVIORS = frozenset({"at-most-one", "any"})
LINK_TYPES = frozenset({"absolute", "smart"})
ACTION_TYPES = frozenset({"create", "update", "delete"})

# "One-sentence, <140-character summary": at most 139 characters.
SUMMARY_MAX = 139
ELLIPSIS = "…"
# FHIR ids are at most 64 characters, but Epic's draft-order ids run to ~194 (Epic tutorial,
# draftOrders with medication references) and a delete suggestion must name them verbatim.
RESOURCE_ID = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,256}$")
# Epic: source.topic.code is "alphanumeric only, max 100 characters"; overrides are remembered
# against it, so it must be a static identifier per card topic.
EPIC_TOPIC_CODE = re.compile(r"^[A-Za-z0-9]{1,100}$")
# Epic renders detail as GitHub Flavored Markdown unless this card extension says otherwise.
EPIC_DETAIL_CONTENT_TYPE = "com.epic.cdshooks.card.detail.content-type"
HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")


def severity(indicator: str | None) -> int:
    """Rank of an indicator (None < info < warning < critical), for comparing cards."""
    return _SEVERITY.index(indicator)


def draft_order(resource_type: str, patient_id: object, **fields: Any) -> dict:
    """A draft order for a `create` suggestion; the clinician signs it in the EHR, or not."""
    resource = {"resourceType": resource_type, "status": "draft", "intent": "order", **fields}
    if isinstance(patient_id, str) and patient_id:
        resource["subject"] = {"reference": f"Patient/{patient_id}"}
    return resource


def _new_uuid() -> str:
    return uuid4_text()


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _require_text(value: object, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-blank string, got {value!r}")


def _optional_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")
    return value if value.strip() else None


def _require_http_url(value: object, name: str) -> None:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an absolute http(s) URL, got {value!r}")


def _tuple_of(obj: object, name: str, kind: type) -> None:
    """Store a list argument as a tuple, so the frozen object is immutable all the way down."""
    value = getattr(obj, name)
    qualified = f"{type(obj).__name__}.{name}"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{qualified} must be a sequence of {kind.__name__}, got {value!r}")
    value = tuple(value)
    for item in value:
        if not isinstance(item, kind):
            raise ValueError(f"{qualified} must contain only {kind.__name__}, got {item!r}")
    _set(obj, name, value)


def _is_empty(value: object) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list | tuple | dict) and not value


def _checked_copy(value: object, path: str) -> object:
    """A copy of a JSON value, refusing non-JSON values, nulls and empty strings/arrays/objects
    at any depth (rules 2-3). One pass, several times cheaper than check + `copy.deepcopy`."""
    if value is None:
        raise ValueError(f"{path} is null; omit the element instead")
    if _is_empty(value):
        raise ValueError(f"{path} is empty; omit the element instead")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has a non-string key {key!r}")
            out[key] = _checked_copy(item, f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return type(value)(_checked_copy(item, f"{path}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, str | int | float):
        raise ValueError(f"{path} is a {type(value).__name__}, not a JSON value")
    return value


def _json_copy(value: Any) -> Any:
    """A copy of a JSON value already checked (`_checked_copy`): what `to_dict` hands out."""
    if isinstance(value, dict):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_json_copy(item) for item in value)
    return value


def _compact(obj: dict) -> dict:
    """Drop unset attributes: rule 4, "an OPTIONAL attribute without a value MUST be omitted"."""
    return {key: value for key, value in obj.items() if value is not None and not _is_empty(value)}


@dataclass(frozen=True)
class Coding:
    code: str
    system: str
    display: str | None = None

    def __post_init__(self) -> None:
        _require_text(self.code, "Coding.code")
        _require_text(self.system, "Coding.system")
        _set(self, "display", _optional_text(self.display, "Coding.display"))

    def to_dict(self) -> dict:
        return _compact({"code": self.code, "system": self.system, "display": self.display})


@dataclass(frozen=True)
class Source:
    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None

    def __post_init__(self) -> None:
        _require_text(self.label, "Source.label")
        for name in ("url", "icon"):
            if getattr(self, name) is not None:
                _require_http_url(getattr(self, name), f"Source.{name}")
        if self.topic is not None and not isinstance(self.topic, Coding):
            raise ValueError(f"Source.topic must be a Coding, got {self.topic!r}")

    def to_dict(self) -> dict:
        return _compact(
            {
                "label": self.label,
                "url": self.url,
                "icon": self.icon,
                "topic": self.topic.to_dict() if self.topic else None,
            }
        )


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    type: str = "absolute"
    app_context: str | None = None
    autolaunchable: bool | None = None

    def __post_init__(self) -> None:
        _require_text(self.label, "Link.label")
        _require_http_url(self.url, "Link.url")
        if self.type not in LINK_TYPES:
            raise ValueError(f"Link.type must be one of {sorted(LINK_TYPES)}, got {self.type!r}")
        # appContext is a string handed to the SMART app as-is: JSON must be pre-serialised.
        _set(self, "app_context", _optional_text(self.app_context, "Link.app_context"))
        if self.app_context is not None and self.type != "smart":
            raise ValueError("Link.app_context is only valid on smart links (cds-resp-3)")
        if self.autolaunchable is not None and not isinstance(self.autolaunchable, bool):
            raise ValueError(f"Link.autolaunchable must be a bool, got {self.autolaunchable!r}")

    def to_dict(self) -> dict:
        return _compact(
            {
                "label": self.label,
                "url": self.url,
                "type": self.type,
                "appContext": self.app_context,
                "autolaunchable": self.autolaunchable,
            }
        )


@dataclass(frozen=True)
class Action:
    """Use `Action.create`, `Action.update` or `Action.delete`."""

    type: str
    description: str
    resource: dict | None = None
    resource_id: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ACTION_TYPES:
            raise ValueError(
                f"Action.type must be one of {sorted(ACTION_TYPES)}, got {self.type!r}"
            )
        _require_text(self.description, "Action.description")
        if self.type == "delete":
            # 2.0 deprecates the 1.0 form that put the id string in `resource` (cds-resp-2).
            if self.resource is not None:
                raise ValueError("a delete Action carries resource_id, never resource")
            if not isinstance(self.resource_id, str) or not RESOURCE_ID.match(self.resource_id):
                raise ValueError(
                    f"Action.resource_id must be a relative reference 'Type/id', "
                    f"got {self.resource_id!r}"
                )
            return
        if self.resource_id is not None:
            raise ValueError(f"a {self.type} Action carries resource, not resource_id")
        if not isinstance(self.resource, dict):
            raise ValueError(
                f"a {self.type} Action needs a FHIR resource dict, got {self.resource!r}"
            )
        _require_text(self.resource.get("resourceType"), "Action.resource.resourceType")
        _set(self, "resource", _checked_copy(self.resource, "Action.resource"))

    @classmethod
    def create(cls, description: str, resource: dict) -> Action:
        return cls("create", description, resource=resource)

    @classmethod
    def update(cls, description: str, resource: dict) -> Action:
        return cls("update", description, resource=resource)

    @classmethod
    def delete(cls, description: str, resource_id: str) -> Action:
        return cls("delete", description, resource_id=resource_id)

    def to_dict(self) -> dict:
        return _compact(
            {
                "type": self.type,
                "description": self.description,
                "resource": _json_copy(self.resource),
                "resourceId": self.resource_id,
            }
        )


@dataclass(frozen=True)
class Suggestion:
    label: str
    actions: tuple[Action, ...] = ()
    is_recommended: bool | None = None
    uuid: str = field(default_factory=_new_uuid)

    def __post_init__(self) -> None:
        _require_text(self.label, "Suggestion.label")
        _tuple_of(self, "actions", Action)
        if self.is_recommended is not None and not isinstance(self.is_recommended, bool):
            raise ValueError(
                f"Suggestion.is_recommended must be a bool, got {self.is_recommended!r}"
            )
        _require_text(self.uuid, "Suggestion.uuid")

    def to_dict(self) -> dict:
        return _compact(
            {
                "label": self.label,
                "uuid": self.uuid,
                "isRecommended": self.is_recommended,
                "actions": [a.to_dict() for a in self.actions],
            }
        )


@dataclass(frozen=True)
class Card:
    summary: str
    indicator: str
    source: Source
    detail: str | None = None
    suggestions: tuple[Suggestion, ...] = ()
    selection_behavior: str | None = None
    override_reasons: tuple[Coding, ...] = ()
    links: tuple[Link, ...] = ()
    uuid: str = field(default_factory=_new_uuid)
    extension: dict | None = None

    def __post_init__(self) -> None:
        _require_text(self.summary, "Card.summary")
        detail = _optional_text(self.detail, "Card.detail")
        summary = self.summary.strip()
        if len(summary) > SUMMARY_MAX:
            # Long data (a drug name) must not fail the request: shorten the summary at a word
            # boundary and keep the full text at the top of detail so nothing is lost.
            cut = summary[: SUMMARY_MAX - len(ELLIPSIS)]
            head, space, _ = cut.rpartition(" ")
            if space and len(head) >= SUMMARY_MAX // 2:
                cut = head
            detail = summary if detail is None else f"{summary}\n\n{detail}"
            summary = cut.rstrip() + ELLIPSIS
        _set(self, "summary", summary)
        _set(self, "detail", detail)

        if self.indicator not in INDICATORS:
            raise ValueError(
                f"Card.indicator must be one of {sorted(INDICATORS)}, got {self.indicator!r}"
            )
        if not isinstance(self.source, Source):
            raise ValueError(f"Card.source must be a Source, got {self.source!r}")
        _tuple_of(self, "suggestions", Suggestion)
        _tuple_of(self, "override_reasons", Coding)
        _tuple_of(self, "links", Link)
        _require_text(self.uuid, "Card.uuid")

        # selectionBehavior MUST be present when suggestions are (rule 77, cds-resp-6).
        if self.suggestions and self.selection_behavior is None:
            _set(self, "selection_behavior", "any")
        if (
            self.selection_behavior is not None
            and self.selection_behavior not in SELECTION_BEHAVIORS
        ):
            raise ValueError(
                f"Card.selection_behavior must be one of "
                f"{sorted(SELECTION_BEHAVIORS)}, got {self.selection_behavior!r}"
            )
        recommended = sum(1 for s in self.suggestions if s.is_recommended)
        if self.selection_behavior == "at-most-one" and recommended > 1:
            raise ValueError("at-most-one allows at most one recommended suggestion (cds-resp-1)")

        for reason in self.override_reasons:
            if reason.display is None:
                raise ValueError(f"override reason {reason.code!r} needs a display (cds-resp-4)")

        if self.extension == {}:
            _set(self, "extension", None)
        if self.extension is not None:
            if not isinstance(self.extension, dict):
                raise ValueError(f"Card.extension must be a dict, got {self.extension!r}")
            _set(self, "extension", _checked_copy(self.extension, "Card.extension"))

    def to_dict(self) -> dict:
        return _compact(
            {
                "uuid": self.uuid,
                "summary": self.summary,
                "indicator": self.indicator,
                "detail": self.detail,
                "source": self.source.to_dict(),
                "suggestions": [s.to_dict() for s in self.suggestions],
                "selectionBehavior": self.selection_behavior,
                "overrideReasons": [r.to_dict() for r in self.override_reasons],
                "links": [link.to_dict() for link in self.links],
                "extension": _json_copy(self.extension),
            }
        )


def _check_epic(card: Card) -> None:
    """Epic's limits that cannot be repaired silently: each is a bug in the service."""
    for suggestion in card.suggestions:
        # Epic: "only a single action per suggestion".
        if len(suggestion.actions) != 1:
            raise ServiceFault(
                f"card {card.summary!r}: suggestion {suggestion.label!r} has "
                f"{len(suggestion.actions)} actions; Epic needs exactly one"
            )
    topic = card.source.topic
    if topic is not None and not EPIC_TOPIC_CODE.match(topic.code):
        raise ServiceFault(
            f"card {card.summary!r}: source.topic.code {topic.code!r} must be "
            f"1-100 alphanumeric characters for Epic"
        )
    content_type = (card.extension or {}).get(EPIC_DETAIL_CONTENT_TYPE)
    if card.detail and HTML_TAG.search(card.detail) and content_type != "text/html":
        raise ServiceFault(
            f"card {card.summary!r}: detail contains HTML but extension "
            f"{EPIC_DETAIL_CONTENT_TYPE} is not text/html"
        )


def render_response(
    cards: Sequence[Card], system_actions: Sequence[Action] = (), *, epic: bool,
    extension: dict | None = None,
) -> dict:
    """The body of a 200 service response; raises ServiceFault if it would be invalid."""
    for card in cards:
        if not isinstance(card, Card):
            raise ServiceFault(f"render_response got {type(card).__name__}, not Card")
    for action in system_actions:
        if not isinstance(action, Action):
            raise ServiceFault(f"render_response got {type(action).__name__}, not Action")

    # Feedback names cards and suggestions by uuid, so a duplicate makes feedback ambiguous.
    seen: set[str] = set()
    for card in cards:
        for uuid in (card.uuid, *(s.uuid for s in card.suggestions)):
            if uuid in seen:
                raise ServiceFault(f"card {card.summary!r}: uuid {uuid!r} is used twice")
            seen.add(uuid)

    rendered = []
    for card in cards:
        body = card.to_dict()
        if epic:
            _check_epic(card)
            # Epic: selectionBehavior "only any is supported".
            if "selectionBehavior" in body:
                body["selectionBehavior"] = "any"
        rendered.append(body)

    response: dict = {"cards": rendered}
    if system_actions:
        response["systemActions"] = [a.to_dict() for a in system_actions]
    if extension:
        response["extension"] = extension
    return response
