"""Variants: declarative, validated specs of what a submission is made of (`builder list` prints them)."""

from __future__ import annotations

import argparse
import json
import re
from functools import cache
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from builder.cli import UserError

SPEC_PACKAGE = "builder.specs"
MODULE_PATTERN = r"^templates(\.[a-z_][a-z0-9_]*)+$"


class VariantSpec(BaseModel):
    """One variant: its entry template, its hyperparameter defaults and the words that describe it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the <Name> of the submission folder
    summary: str
    blurb: str
    entry: str = Field(default="templates.train", pattern=MODULE_PATTERN)
    modules: list[str] = Field(default_factory=list)  # the parts it names: mixers, input features, codecs
    origin: str = ""  # the pull request it comes from, e.g. "openai/parameter-golf#1994"
    defaults: dict[str, str | int | float] = Field(default_factory=dict)  # the record recipe (600 s, 8 GPUs)
    non_record_defaults: dict[str, str | int | float] = Field(default_factory=dict)  # over defaults, non-record
    architecture: list[tuple[str, str]] = Field(default_factory=list)
    differences: list[str] = Field(default_factory=list)  # what differs from the origin, and why

    @field_validator("modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not re.fullmatch(MODULE_PATTERN, m)]
        if bad:
            raise ValueError(f"modules must be templates.<module> names, not {bad}")
        return v

    @field_validator("defaults", "non_record_defaults")
    @classmethod
    def _upper_names(cls, v: dict[str, str | int | float]) -> dict[str, str | int | float]:
        bad = [k for k in v if not k.isupper() or not k.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"default names must be environment variable names, not {bad}")
        return v

    def defaults_as_strings(self, track: str = "record") -> dict[str, str]:
        """The environment defaults of the recipe for `track` ("record" or "non-record")."""
        merged = dict(self.defaults)
        if track == "non-record":
            merged.update(self.non_record_defaults)
        return {k: str(v) for k, v in merged.items()}


@cache
def load_variants() -> dict[str, VariantSpec]:
    """Every spec under builder/specs/, by name. A bad spec is an error naming its file."""
    out = {}
    for item in sorted(resources.files(SPEC_PACKAGE).iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".json"):
            continue
        try:
            spec = VariantSpec.model_validate(json.loads(item.read_text(encoding="utf-8")))
        except (ValueError, ValidationError) as exc:
            raise UserError(f"builder/specs/{item.name}: invalid variant spec: {exc}") from exc
        if spec.name in out:
            raise UserError(f"builder/specs/{item.name}: variant name {spec.name!r} is used twice")
        out[spec.name] = spec
    return out


def get_variant(name: str) -> VariantSpec:
    variants = load_variants()
    if name not in variants:
        known = ", ".join(sorted(variants)) or "none"
        raise UserError(f"unknown variant {name!r}; choose one of: {known} (see `builder list`)")
    return variants[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults()


def run(args: argparse.Namespace) -> int:
    variants = load_variants()
    width = max((len(n) for n in variants), default=0)
    for name, spec in variants.items():
        print(f"{name:<{width}}  {spec.summary}")
    return 0
