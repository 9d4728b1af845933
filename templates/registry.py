"""Parts by name: a variant's declaration names its mixers, MLPs, input features, quantisers and compressors,
and the stack looks them up here. A mixer file registers its class with `@register_mixer("name")` when it is
imported; the assembled script holds only the parts its variant names.
"""

from collections.abc import Callable
from typing import Any

MIXERS: dict[str, Any] = {}
MLPS: dict[str, Any] = {}
FEATURES: dict[str, Any] = {}
QUANTISERS: dict[str, Any] = {}
COMPRESSORS: dict[str, Any] = {}
STAGES: dict[str, Any] = {}  # optional training/export/scoring stages; "step:<name>" runs after every step


def register(table: dict[str, Any], name: str) -> Callable[[Any], Any]:
    """`register(MLPS, "relu2")(part)`, or as a decorator; a name taken by another part is an error."""

    def add(obj: Any) -> Any:
        if table.get(name, obj) is not obj:
            raise ValueError(f"two parts are registered as {name!r}")
        table[name] = obj
        return obj

    return add


def register_mixer(name: str) -> Callable[[Any], Any]:
    """Class decorator: `@register_mixer("attention")`. The class takes (dim, linear, **options)."""
    return register(MIXERS, name)


def register_feature(name: str) -> Callable[[Any], Any]:
    """Class decorator for an input feature added to the token embedding; takes (vocab_size, dim, **options)."""
    return register(FEATURES, name)


def lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    """The part registered as `name`, or a one-line error listing the ones this script has."""
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unknown {kind} {name!r}: this script has {known} (assemble the variant that uses it)")
    return table[name]
