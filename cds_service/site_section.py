"""`SiteSection`: the base schema of every mapping in a site file (and of a service's own
`settings:`), which refuses a key it does not read with the closest valid one.

A leaf module so that what builds on it (the site configuration, the bulk export settings, a
service's settings schema) never has to import `cds_service.config` for it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, pre_load

# Keys starting with this are the site team's annotations (who changed what, a ticket number),
# ignored at every level of a site file.
ANNOTATION_PREFIX = "x-"


def unknown_key(key: Any, known: Sequence[str]) -> str:
    """The error for a key no schema reads, with the closest valid one."""
    # difflib's default cutoff (0.6) offers `cors` for `colour`; a typo scores 0.8 and more.
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean `{close[0]}`?"
    return f"unknown key (valid keys: {', '.join(sorted(known))})"


class SiteSection(Schema):
    """A mapping in a site file. A key it does not read is an error naming the closest valid
    one: a typo (`code_mapings`) would otherwise silently drop the setting and, with it, the
    cards it feeds. `x-…` keys are annotations and are dropped before loading."""

    class Meta:
        unknown = RAISE

    @pre_load
    def _only_known_keys(self, data: Any, **kwargs: Any) -> Any:
        if not isinstance(data, Mapping):
            return data  # the field's own type error
        known = [f.data_key or name for name, f in self.load_fields.items()]
        annotation = [k for k in data if isinstance(k, str) and k.startswith(ANNOTATION_PREFIX)]
        errors = {key: [unknown_key(key, known)] for key in data
                  if key not in known and key not in annotation}
        if errors:
            raise ValidationError(errors)
        return {k: v for k, v in data.items() if k not in annotation}
