"""What a CDS service is: declarative metadata plus one function from a parsed request to cards,
and what it may read of the site it runs for (`SiteView`, `Orderable`).

Services live in `hooks/` (one module each) and are listed, in order, in the literal tuple
`hooks.SERVICES`. Discovery and routing are both generated from that tuple, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cds_service.data.prefetch import Prefetch
    from cds_service.features import CodeMap
    from cds_service.models.binding import ModelBinding
    from cds_service.protocol.cards import Card

# The hooks Epic supports (CDS Hooks Library STU1; Epic tutorial: "As of Epic version May 2021,
# Epic primarily supports three standard hooks").
HOOKS = ("patient-view", "order-select", "order-sign")


@dataclass(frozen=True)
class Orderable:
    """What a suggestion orders at this site. Epic pends an order from a preference-list item
    (system `urn:com.epic.cdshooks.action.code.system.preference-list-item`), so the code is the
    hospital's, never ours (Epic CDS Hooks tutorial, "Creating unsigned orders")."""

    system: str
    code: str
    display: str

    def concept(self) -> dict[str, Any]:
        return {"coding": [{"system": self.system, "code": self.code, "display": self.display}],
                "text": self.display}


class SiteView(Protocol):
    """What a service reads of its site: a `config.Site` at run time, named here by what is read
    so that a service never depends on the site configuration module."""

    @property
    def code_map(self) -> CodeMap: ...

    @property
    def orderables(self) -> Mapping[str, Orderable]: ...


@dataclass(frozen=True)
class HookRequest:
    """A validated invocation, as a service handler sees it."""

    service_id: str
    hook: str
    hook_instance: str
    context: Mapping[str, Any]
    prefetch: Prefetch
    site: SiteView
    extension: Mapping[str, Any] = field(default_factory=dict)
    fhir_server: str | None = None
    # The site's model for this service (None when the service uses none).
    model: ModelBinding | None = None
    # This site's `services.<id>.settings`, loaded by the service's `settings_schema`.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # "Now" for look-back windows and ages (the runtime clock; tests freeze it).
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Times a named stage of this call: the view passes `metrics.stage`; untimed elsewhere. A
    # service marks its stages through it and imports no metrics (timing is the caller's job).
    stage: Callable[[str], AbstractContextManager[None]] = field(
        default=lambda name: nullcontext())


Handler = Callable[[HookRequest], "Sequence[Card]"]


@dataclass(frozen=True)
class CdsService:
    """One CDS service: `id` is its URL segment; it may answer several hooks (rule 15)."""

    id: str
    hooks: tuple[str, ...]
    title: str
    description: str
    handler: Handler
    prefetch: Mapping[str, str] = field(default_factory=dict)
    usage_requirements: str | None = None
    # Keys the service can do without: when they cannot be obtained they resolve to None
    # instead of failing the call with 412.
    optional_prefetch: frozenset[str] = frozenset()
    # Id of the model (a directory under models/) this service scores with unless a site names
    # another; None for services without a model.
    model: str | None = None
    # marshmallow Schema class validating `services.<id>.settings` in site config (defaults
    # filled in); None for a service without site settings.
    settings_schema: type | None = None
    # Site orderables (site `orderables` keys) the service's suggestions use → what the card
    # loses at a site without one (`cds-service site check` warns about those missing).
    orderables: Mapping[str, str] = field(default_factory=dict)
    # The feature spec lists (`FeatureSpec` tuples) its handler extracts, besides its model's:
    # compiled when the deployment loads (`features.prepare`), not on a worker's first call.
    feature_groups: tuple[tuple, ...] = ()

    def __post_init__(self):
        unknown = [h for h in self.hooks if h not in HOOKS]
        if not self.hooks or unknown:
            raise ValueError(f"service {self.id!r}: hooks must be a non-empty subset of {HOOKS}")
        if not self.id or "/" in self.id:
            raise ValueError(f"service id {self.id!r} must be a non-empty URL segment")
        if not self.description.strip():
            raise ValueError(f"service {self.id!r}: description is required (rule 12)")
        stray = self.optional_prefetch - set(self.prefetch)
        if stray:
            raise ValueError(f"service {self.id!r}: optional_prefetch names unknown keys {stray}")
        object.__setattr__(self, "prefetch", MappingProxyType(dict(self.prefetch)))


def index_services(services: Sequence[CdsService]) -> dict[str, CdsService]:
    """Map id → service, refusing duplicate ids (one id serves several hooks via `hooks`)."""
    by_id: dict[str, CdsService] = {}
    for service in services:
        if service.id in by_id:
            raise ValueError(f"duplicate service id {service.id!r} in the registry")
        by_id[service.id] = service
    return by_id
