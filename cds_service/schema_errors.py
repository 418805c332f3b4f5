"""marshmallow validation messages, flattened: into OperationOutcome issues for an HTTP answer
(`messages_to_issues`), or into one line naming each bad key for a configuration, manifest or
data file (`describe_errors`).

A leaf module on purpose: configuration, model manifests and the services' data files describe
their schema errors with it, and none of them may import the HTTP layer's schemas to do so.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError

from cds_service.protocol.errors import Issue


def describe_errors(error: ValidationError, prefix: str = "") -> str:
    """A schema error as one line naming each bad key (under `prefix`, for a nested section),
    for configuration-file messages."""
    return "; ".join(issue.diagnostics for issue in messages_to_issues(error.messages, prefix))


def messages_to_issues(messages: Any, prefix: str = "") -> list[Issue]:
    """Flatten marshmallow/webargs error messages into OperationOutcome issues with paths."""
    if isinstance(messages, dict):
        issues: list[Issue] = []
        for key, value in messages.items():
            if key in ("json", "_schema") and not prefix:
                issues += messages_to_issues(value, prefix)
                continue
            if key == "value" and isinstance(value, dict):
                issues += messages_to_issues(value, prefix)
                continue
            if isinstance(key, int):
                path = f"{prefix}[{key}]"
            elif key == "_schema":
                path = prefix
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            issues += messages_to_issues(value, path)
        return issues
    if isinstance(messages, list | tuple):
        if all(isinstance(m, str) for m in messages):
            code = "required" if any("Missing data" in m for m in messages) else "invalid"
            text = " ".join(messages)
            where = prefix or "request body"
            return [Issue(f"{where}: {text}", code=code, expression=(prefix,) if prefix else ())]
        issues = []
        for item in messages:
            issues += messages_to_issues(item, prefix)
        return issues
    where = prefix or "request body"
    return [Issue(f"{where}: {messages}", expression=(prefix,) if prefix else ())]
