"""Registry of compressors and projectors, keyed by stable names used in recipes.

Recipes name components (`{name: mlp2x_gelu}`), never Python import paths, so a recipe cannot
run arbitrary code. Adding a component: one file here with `@register("name")` on its class,
imported at the bottom of this module.
"""

from __future__ import annotations

import dataclasses
import difflib

from models.compressors.base import STAGES, Compressor, ModelDims, VisionFeatures

_REGISTRY: dict[str, type[Compressor]] = {}


def register(name: str):
    def add(cls: type[Compressor]) -> type[Compressor]:
        if name in _REGISTRY:
            raise ValueError(f"component {name!r} is registered twice")
        if cls.stage not in STAGES:
            raise ValueError(f"{cls.__name__}.stage must be one of {STAGES}, not {cls.stage!r}")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available(stage: str | None = None) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if stage is None or c.stage == stage)


def unknown_name_message(name: str) -> str:
    known = available()
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown component {name!r}{hint} Known: {', '.join(known)}"


def component_class(name: str) -> type[Compressor]:
    if name not in _REGISTRY:
        raise KeyError(unknown_name_message(name))
    return _REGISTRY[name]


def build_component(name: str, params: dict | None, dims: ModelDims) -> Compressor:
    """Instantiate registered component `name` with `params` (its Config's fields)."""
    cls = component_class(name)
    config = cls.Config(**(params or {}))
    return cls(config, dims)


def baselines() -> dict[str, str]:
    """{baseline label: component name} of every training-free baseline (`Compressor.baseline`),
    ordered by where they act (on the pixels, in the vision tower, before the LLM, inside it), then
    by label."""
    found = [(STAGES.index(cls.stage), cls.baseline, name) for name, cls in _REGISTRY.items() if cls.baseline]
    return {label: name for _, label, name in sorted(found)}


def config_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(component_class(name).Config)}


# Importing the modules registers their components.
from models.compressors import (  # noqa: E402,F401
    covipal,
    divprune,
    downsample,
    dyvte,
    falcon,
    fastv,
    llavolta,
    mlp,
    pooling,
    pyramid_drop,
    random_keep,
    tokenpacker,
    visionzip,
)

__all__ = [
    "Compressor",
    "ModelDims",
    "VisionFeatures",
    "register",
    "available",
    "baselines",
    "build_component",
    "component_class",
    "config_fields",
    "unknown_name_message",
]
