"""Exception hierarchy, and the one OperationOutcome shape every error response uses.

`CdsError` is the root of every exception a request can end with (auth, replay cache, store, JSON
depth, ...): each knows its HTTP status, its FHIR issue type and any response headers, and
`cds_service.protocol.http` translates them to responses in exactly one place. This module imports
nothing of the project or of Flask, so any layer may raise them. Messages must be safe to show to
the caller: never include a token, a stack trace, or resource contents; a class whose message is for
the log only sets `diagnostics`, the text the caller sees instead.

CDS Hooks 3.0 ballot (rule 111): "services SHOULD return an OperationOutcome body on non-2xx".
Issue types are from http://hl7.org/fhir/valueset-issue-type.html.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue: what went wrong and, when known, where (`expression`)."""

    diagnostics: str
    code: str = "invalid"
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict:
        issue = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


def operation_outcome(issues: Iterable[Issue]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class CdsError(Exception):
    """An error answered with an OperationOutcome body and `status`."""

    status = 500
    code = "exception"
    diagnostics: str | None = None  # shown instead of the message, which then is for the log only
    headers: Mapping[str, str] = MappingProxyType({})
    log_level = logging.INFO

    def __init__(self, message: str, *, issues: Sequence[Issue] = ()):
        super().__init__(message)
        self.message = message
        self.issues = tuple(issues) or (Issue(self.diagnostics or message, code=self.code),)

    def to_operation_outcome(self) -> dict:
        return operation_outcome(self.issues)


class RequestInvalid(CdsError):
    """The request body is not a valid CDS Hooks request, feedback or hook context."""

    status = 400
    code = "invalid"


class ServiceNotFound(CdsError):
    """No service with this id is enabled for the caller's site."""

    status = 404
    code = "not-found"


class PrefetchUnavailable(CdsError):
    """Data the service needs is neither prefetched nor obtainable from the FHIR server (412)."""

    status = 412
    code = "incomplete"


class FhirAccessError(PrefetchUnavailable):
    """The EHR's FHIR server refused, failed, or was too slow for a fallback read."""


class ServiceFault(CdsError):
    """A CDS service produced an invalid response: our bug, never the caller's data."""

    status = 500
    code = "exception"


class ConfigError(Exception):
    """Site or deployment configuration is invalid; raised at start-up, naming file and key."""
