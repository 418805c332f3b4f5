"""Model errors: raised at start-up or by the `cds-service models` commands, never per request."""

from __future__ import annotations

from cds_service.protocol.errors import ConfigError


class ModelError(ConfigError):
    """A model directory, manifest or artifact is invalid or unsafe; the message names which."""
