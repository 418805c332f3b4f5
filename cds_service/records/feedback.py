"""Feedback requests (`POST /cds-services/{id}/feedback`) parsed into normalized `FeedbackItem`s.

Two shapes reach us (conformance rules 99-105 and section 3.5):

* CDS Hooks 2.0 <https://cds-hooks.hl7.org/2.0/#feedback>: `overrideReason` (singular) holding a
  `reason` Coding and/or a `userComment`.
* Epic <https://fhir.epic.com/Documentation?docId=cds-hooks> (Feedback section): `overrideReasons`
  (plural, still one object) holding either a `reason` Coding (a reason the card offered) or an
  `extension` object with a reason from Epic build, plus `userComment`. Epic card ids need not be
  UUIDs ("123456").

Tolerance policy: unknown keys are ignored at every level (`unknown = EXCLUDE`) but kept verbatim in
`FeedbackItem.raw`, so nothing Epic sends is lost. `null` for an optional field counts as absent
(rule 2 forbids nulls, but a feedback record is worth more than the objection). Departures from the
spec that still leave a usable record go to `FeedbackItem.warnings`. Anything that leaves no usable
record (no card, unknown outcome, no or unparseable timestamp, a timestamp more than
`MAX_CLOCK_SKEW` ahead of our clock, malformed suggestion or reason Coding, wrong JSON types, a NUL
character in a field we read) raises `marshmallow.ValidationError`, keyed by item index, e.g.
`{"feedback": {0: {"outcome": [...]}}}`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

# How far ahead of our clock an outcomeTimestamp may be. The EHR's clock and ours drift (NTP keeps
# them within a second; a VM resumed from a snapshot can be minutes off until it resyncs). Further
# ahead it is not when the clinician acted, and as an override time it would silence the card
# until then: a timestamp in 2099 did, for years.
MAX_CLOCK_SKEW = timedelta(minutes=5)

ACCEPTED = "accepted"
OVERRIDDEN = "overridden"
OUTCOMES = (ACCEPTED, OVERRIDDEN)

# Epic sends reasons picked from Epic build (not from the card's overrideReasons) as an object of
# these keys; `reasonCategory` is an Epic-internal category number ("45"), not a FHIR code.
EPIC_REASON_CATEGORY = "com.epic.cdshooks.feedback.overrideReason.reasonCategory"
EPIC_REASON_DISPLAY = "com.epic.cdshooks.feedback.overrideReason.reasonDisplay"
EPIC_REASON_TITLE = "com.epic.cdshooks.feedback.overrideReason.reasonTitle"


@dataclass(frozen=True, kw_only=True)
class FeedbackItem:
    """One normalized Feedback entry. `raw` is the item exactly as received (a deep copy)."""

    card: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...] = ()
    override_code: str | None = None
    override_system: str | None = None
    override_display: str | None = None
    user_comment: str | None = None
    override_extension: dict | None = None
    raw: dict
    warnings: tuple[str, ...] = ()

    def dedupe_key(self, site: str, service_id: str) -> str:
        """sha256 hex of the canonical JSON of (site, service_id, raw item).

        Rule 105: a client may send the same feedback more than once; a byte-for-byte replay (up to
        key order and whitespace) of the same item for the same site and service is one record.
        """
        canonical = json.dumps(
            {"site": site, "service_id": service_id, "item": self.raw},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,  # a lone surrogate in an unread key must not break hashing
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# RFC 3339 §5.6 `date-time`. Stricter than `datetime.fromisoformat`, which also takes ISO 8601
# forms RFC 3339 excludes (basic format "20211211T100531Z", week dates, hour-only offsets).
# RFC 3339 allows lower-case "t"/"z" (§5.6 NOTE), and fractional seconds of any length
# (spec example: "1985-04-12T23:20:50.52Z").
_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt]"
    r"(?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<tz>[Zz]|[+-]\d{2}:\d{2})?"
)


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 date-time into an aware UTC datetime; raise ValueError otherwise.

    Fractional seconds beyond microseconds are truncated. A leap second (":60") is rejected, as
    Python cannot represent it. "-00:00" ("offset unknown", RFC 3339 §4.3) is read as UTC.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    tz = match["tz"]
    # Decision: a time without offset is rejected, not assumed UTC. CDS Hooks 2.0 requires
    # "ISO 8601 representation of the date and time in UTC (RFC 3339 §5.6)", where time-offset is
    # mandatory; guessing a zone could shift analytics by hours without anyone noticing.
    if tz is None:
        raise ValueError("missing time zone offset")
    frac = (match["frac"] or "")[:6].ljust(6, "0")
    naive = datetime.fromisoformat(f"{match['date']}T{match['h']}:{match['m']}:{match['s']}.{frac}")
    if tz in ("Z", "z"):
        offset = timedelta(0)
    else:
        hours, minutes = int(tz[1:3]), int(tz[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("offset out of range")
        offset = (1 if tz[0] == "+" else -1) * timedelta(hours=hours, minutes=minutes)
    return naive.replace(tzinfo=timezone(offset)).astimezone(UTC)


class Rfc3339DateTime(fields.DateTime):
    """A `date-time` per RFC 3339 §5.6, loaded as an aware datetime in UTC.

    Subclasses `fields.DateTime` only so OpenAPI documents it as `string`/`date-time`; parsing is
    our own (marshmallow's ISO parser accepts naive values and non-RFC 3339 forms).
    """

    default_error_messages = {
        "invalid": "Not a valid RFC 3339 date-time (expected e.g. 2021-12-11T10:05:31Z).",
        "naive": "Date-time has no time zone offset; RFC 3339 §5.6 requires 'Z' or ±hh:mm.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            return parse_rfc3339(value)
        except ValueError as exc:
            if str(exc) == "missing time zone offset":
                raise self.make_error("naive") from exc
            raise self.make_error("invalid") from exc

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be blank.")


NUL_MESSAGE = "Must not contain a NUL character (\\u0000)."
SURROGATE_MESSAGE = "Must be valid Unicode (a lone UTF-16 surrogate such as \\ud800 was sent)."


class Text(fields.String):
    """A string without NUL characters.

    JSON allows "\\u0000" in a string, but PostgreSQL `text` cannot hold it (psycopg raises
    DataError, which would be a 500), so it is rejected here, naming the field, on every backend.
    Unknown keys are not checked: they are stored only inside JSON text (`raw`), where the
    character stays escaped.
    """

    default_error_messages = {"nul": NUL_MESSAGE, "surrogate": SURROGATE_MESSAGE}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise self.make_error("nul")
        try:
            text.encode("utf-8")  # JSON "\ud800" decodes to a str no database can store
        except UnicodeEncodeError as exc:
            raise self.make_error("surrogate") from exc
        return text


def _no_nul(value: Any, where: str = "") -> None:
    """Reject a NUL character in any key or string value of a JSON object (for `extension`)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationError(f"{NUL_MESSAGE[:-1]} (in {where or 'value'}).")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key, f"a key of {where}" if where else "a key")
            _no_nul(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_nul(item, f"{where}[{index}]")


class _Lenient(Schema):
    error_messages = {"type": "Must be a JSON object."}

    class Meta:
        # EXCLUDE, not INCLUDE: extra keys (Epic extensions, future spec fields) are accepted and
        # left out of the loaded data; they survive in FeedbackItem.raw. RAISE would 400 Epic for
        # fields we do not use.
        unknown = EXCLUDE


class CodingSchema(_Lenient):
    """A CDS Hooks Coding: `code` and `system` REQUIRED, `display` optional (spec example has none).

    `system` is not checked as a URI: Epic's own example sends "http: //example.org/..." (sic).
    """

    code = Text(required=True, validate=_not_blank)
    system = Text(required=True, validate=_not_blank)
    display = Text(allow_none=True)


class OverrideReasonSchema(_Lenient):
    """`overrideReason` (spec) or `overrideReasons` (Epic): Coding, Epic extension, comment."""

    reason = fields.Nested(CodingSchema, allow_none=True)
    userComment = Text(allow_none=True)
    # Its Epic reason keys become override_code/override_display (text columns); the whole object
    # is stored as override_extension.
    extension = fields.Dict(keys=fields.String(), allow_none=True, validate=_no_nul)


class AcceptedSuggestionSchema(_Lenient):
    id = Text(required=True, validate=_not_blank)


class FeedbackItemSchema(_Lenient):
    """One Feedback object, loaded as a `FeedbackItem`."""

    card = Text(required=True, validate=_not_blank)
    outcome = fields.String(required=True, validate=validate.OneOf(OUTCOMES))
    outcomeTimestamp = Rfc3339DateTime(required=True)
    acceptedSuggestions = fields.List(fields.Nested(AcceptedSuggestionSchema), allow_none=True)
    overrideReason = fields.Nested(OverrideReasonSchema, allow_none=True)
    overrideReasons = fields.Nested(OverrideReasonSchema, allow_none=True)

    @post_load(pass_original=True)
    def make_item(self, data: dict, original: dict, **kwargs: Any) -> FeedbackItem:
        warnings: list[str] = []
        outcome = data["outcome"]
        suggestions = tuple(s["id"] for s in data.get("acceptedSuggestions") or ())
        if outcome == ACCEPTED and not suggestions:
            # Rule 102 / invariant cds-fb-2: REQUIRED for accepted; tolerated but flagged.
            warnings.append("outcome 'accepted' without acceptedSuggestions (cds-fb-2)")
        if outcome == OVERRIDDEN and suggestions:
            warnings.append("outcome 'overridden' with acceptedSuggestions; kept as sent")

        reason = data.get("overrideReason")
        epic_reason = data.get("overrideReasons")
        if reason is not None and epic_reason is not None:
            warnings.append("both overrideReason and overrideReasons sent; used overrideReason")
        sent_reason = reason is not None or epic_reason is not None
        reason = reason if reason is not None else epic_reason or {}
        if sent_reason and outcome == ACCEPTED:
            warnings.append("override reason sent with outcome 'accepted'; kept as sent")

        coding = reason.get("reason") or {}
        extension = reason.get("extension")
        code = coding.get("code")
        system = coding.get("system")
        display = coding.get("display")
        if not coding and extension:
            # Epic build reason: no code system exists for it, so override_system stays None and
            # the category number is the code; the full object is kept in override_extension.
            code = _scalar_text(extension.get(EPIC_REASON_CATEGORY))
            display = _scalar_text(extension.get(EPIC_REASON_DISPLAY)) or _scalar_text(
                extension.get(EPIC_REASON_TITLE)
            )
        comment = reason.get("userComment")
        if sent_reason and not coding and not extension and not comment:
            # Invariant cds-fb-3: an override reason carries a reason or a userComment.
            warnings.append("override reason without reason, extension or userComment (cds-fb-3)")

        return FeedbackItem(
            card=data["card"],
            outcome=outcome,
            outcome_timestamp=data["outcomeTimestamp"],
            accepted_suggestions=suggestions,
            override_code=code,
            override_system=system,
            override_display=display,
            user_comment=comment,
            override_extension=extension or None,
            raw=copy.deepcopy(original),
            warnings=tuple(warnings),
        )


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


class FeedbackRequestSchema(_Lenient):
    """The request body `{"feedback": [Feedback, ...]}`; `load()` returns `list[FeedbackItem]`.

    `clock` is "now" for the bound on `outcomeTimestamp` (at most `MAX_CLOCK_SKEW` ahead): the
    app's clock, which tests move. Checked here, not in `FeedbackItemSchema`, because marshmallow
    builds nested schemas itself and could not hand them the clock.
    """

    feedback = fields.List(
        fields.Nested(FeedbackItemSchema),
        required=True,
        validate=validate.Length(min=1, error="Must contain at least one feedback item."),
    )

    def __init__(self, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.clock = clock

    @validates_schema(skip_on_field_errors=True)
    def _not_ahead_of_our_clock(self, data: dict, **kwargs: Any) -> None:
        now = self.clock()
        message = (f"Must not be more than {MAX_CLOCK_SKEW.total_seconds() / 60:g} minutes after "
                   f"this server's time ({now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}).")
        ahead = {index: {"outcomeTimestamp": [message]}
                 for index, item in enumerate(data["feedback"])
                 if item.outcome_timestamp > now + MAX_CLOCK_SKEW}
        if ahead:
            raise ValidationError(ahead, "feedback")

    @post_load
    def make_items(self, data: dict, **kwargs: Any) -> list[FeedbackItem]:
        return list(data["feedback"])
