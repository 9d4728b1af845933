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


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    def add(obj: Any) -> Any:
        if name in table and table[name] is not obj:
            raise ValueError(f"two {kind}s are registered as {name!r}")
        table[name] = obj
        return obj

    return add


def register_mixer(name: str) -> Callable[[Any], Any]:
    """Class decorator: `@register_mixer("attention")`. The class takes (dim, linear, **options)."""
    return _register(MIXERS, "mixer", name)


def register_mlp(name: str) -> Callable[[Any], Any]:
    return _register(MLPS, "MLP", name)


def register_feature(name: str) -> Callable[[Any], Any]:
    """Class decorator for an input feature added to the token embedding; takes (vocab_size, dim, **options)."""
    return _register(FEATURES, "input feature", name)


def register_quantiser(name: str) -> Callable[[Any], Any]:
    return _register(QUANTISERS, "quantiser", name)


def register_compressor(name: str) -> Callable[[Any], Any]:
    return _register(COMPRESSORS, "compressor", name)


def lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    """The part registered as `name`, or a one-line error listing the ones this script has."""
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unknown {kind} {name!r}: this script has {known} (assemble the variant that uses it)")
    return table[name]
