"""Domain modules: how each kind of data becomes fields, paths, networks, features and metrics.

`DOMAINS` names the built-in domains; each entry imports its module only when asked for, so a
run on time series never imports the heavy libraries of other domains. A user's own domain is
named by its import path, "package.module:ClassName".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from archipelago.experts.domain import Domain


def _timeseries() -> type[Domain]:
    from archipelago.domains.timeseries.domain import TimeSeriesDomain

    return TimeSeriesDomain


def _graphs() -> type[Domain]:
    from archipelago.domains.graphs.domain import GraphDomain

    return GraphDomain


def _crystals() -> type[Domain]:
    from archipelago.domains.crystals.domain import CrystalDomain

    return CrystalDomain


def _images() -> type[Domain]:
    from archipelago.domains.images.domain import ImageDomain

    return ImageDomain


DOMAINS: dict[str, Callable[[], type[Domain]]] = {"timeseries": _timeseries, "graphs": _graphs, "crystals": _crystals,
                                                  "images": _images}


def domain_class(name: str) -> type[Domain]:
    """The Domain subclass for a built-in name or a "module:Class" import path."""
    if name in DOMAINS:
        return DOMAINS[name]()
    if ":" in name:
        module, _, qualname = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), qualname)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import domain {name!r}: {error}") from error
        if isinstance(found, type) and issubclass(found, Domain):
            return found
        raise ValueError(f"{name!r} is not a Domain subclass")
    raise ValueError(f"unknown domain {name!r}; built-in domains: {sorted(DOMAINS)} (or 'module:Class')")


def domain_reference(domain: Domain) -> str:
    """The name that `domain_class` resolves back to this domain's class."""
    cls = type(domain)
    if DOMAINS.get(cls.name, lambda: None)() is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"
