"""Fusing chunk KV caches (full prefill, reuse, CacheBlend, APE, EPIC) and decoding from them."""

from __future__ import annotations


import dataclasses
from collections.abc import Mapping
from typing import Any

from chunkcache.blend.base import FusionInput, FusionResult, FusionStrategy
from chunkcache.blend.cacheblend import CacheBlend
from chunkcache.blend.cachecraft import CacheCraft
from chunkcache.blend.decode import Sampling
from chunkcache.blend.layout import FusedCache
from chunkcache.blend.strategies import Ape, Epic, FullPrefill, Reuse
from chunkcache.errors import InvalidInputError, UnknownStrategyError

STRATEGIES: dict[str, type] = {
    "full": FullPrefill,
    "reuse": Reuse,
    "cacheblend": CacheBlend,
    "ape": Ape,
    "epic": Epic,
    "cachecraft": CacheCraft,
}


def make_strategy(name: str, defaults: Mapping[str, Any] | None = None, **params: Any) -> FusionStrategy:
    """Build a strategy by name. ``defaults`` (e.g. from Settings) fill the fields the strategy
    has; ``params`` must all be fields of that strategy."""
    if name not in STRATEGIES:
        raise UnknownStrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        takes = ", ".join(sorted(fields)) or "no parameters"
        raise InvalidInputError(f"strategy {name!r} has no parameter {', '.join(unknown)} (it takes: {takes})")
    kwargs = {k: v for k, v in (defaults or {}).items() if k in fields}
    kwargs.update(params)
    try:
        return cls(**{k: _coerce(fields[k], v) for k, v in kwargs.items()})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"bad parameter for strategy {name!r}: {exc}") from None


# The one numeric knob a "name:value" spec sets, per strategy name.
_SPEC_PARAMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cacheblend": ("cacheblend", "recompute_ratio", {}),
    "cacheblend-random": ("cacheblend", "recompute_ratio", {"selection": "random"}),
    "epic": ("epic", "epic_k", {}),
    "ape": ("ape", "ape_temperature", {}),
    "cachecraft": ("cachecraft", "alpha", {}),
}


def parse_strategy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cacheblend:0.15"`` -> ("cacheblend", {"recompute_ratio": 0.15}); ``"cacheblend-random:R"``
    spends the same budget on random tokens; a bare name takes the defaults; further
    ``:key=value`` parts set other parameters (``cacheblend:0.15:selection=kv:sinks=8``)."""
    head, *options = spec.strip().split(":")
    extra: dict[str, Any] = {}
    value = ""
    for option in options:
        key, eq, val = option.partition("=")
        if eq:
            extra[key.strip()] = val.strip()
        elif not value:
            value = option
        else:
            raise InvalidInputError(f"strategy {spec!r}: write further parameters as key=value")
    name, params = _parse_name_value(spec, head, value)
    if extra:
        make_strategy(name, **params, **extra)  # validates names and values now
    return name, {**params, **extra}


def _parse_name_value(spec: str, name: str, value: str) -> tuple[str, dict[str, Any]]:
    if name in STRATEGIES and not value:
        return name, {}
    if name not in _SPEC_PARAMS:
        known = sorted(set(STRATEGIES) | set(_SPEC_PARAMS))
        raise UnknownStrategyError(f"unknown strategy {spec!r}; choose from {', '.join(known)} (name[:value])")
    target, param, extra = _SPEC_PARAMS[name]
    params = dict(extra)
    if value:
        try:
            params[param] = float(value) if param != "epic_k" else int(value)
        except ValueError:
            raise InvalidInputError(f"strategy {spec!r}: {value!r} is not a number") from None
    return target, params


_VALUE_FORMS = {  # the VALUE of NAME:VALUE each spec takes, as a regex of what is valid
    "recompute_ratio": r"(?:0*(?:0(?:\.[0-9]*)?|\.[0-9]+)|0*1(?:\.0*)?)",  # [0, 1]
    "epic_k": r"[0-9]+",
    "ape_temperature": r"(?:[0-9]*[1-9][0-9]*(?:\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)",  # > 0
}
_ANY_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"


def spec_pattern() -> str:
    """A regex of the ``NAME[:VALUE]`` specs that are valid, VALUE in its range, for a schema to
    state (names are plain [a-z-], valid in Python's and JSON Schema's regexes alike). Specs with
    ``:key=value`` parameters are accepted beyond it: their values are checked by the strategy,
    which a pattern cannot say."""
    forms = [name for name in STRATEGIES if name not in _SPEC_PARAMS]
    for name, (_, param, _) in _SPEC_PARAMS.items():
        forms.append(f"{name}(?::{_VALUE_FORMS.get(param, _ANY_NUMBER)})?")
    return "^(?:" + "|".join(forms) + ")?$"  # empty: the default strategy


def spec_forms() -> str:
    """The ``NAME[:VALUE]`` forms in words, e.g. ``full, reuse, cacheblend[:RECOMPUTE_RATIO], ...``."""
    return ", ".join(name + (f"[:{_SPEC_PARAMS[name][1].upper()}]" if name in _SPEC_PARAMS else "")
                     for name in [*STRATEGIES, *(n for n in _SPEC_PARAMS if n not in STRATEGIES)])


def names_taking(param: str) -> list[str]:
    """The spec names whose strategy has parameter ``param``."""
    names = [n for n, cls in STRATEGIES.items() if param in {f.name for f in dataclasses.fields(cls)}]
    return names + [n for n, (target, _, _) in _SPEC_PARAMS.items() if target in names and n not in names]


def describe_strategies(defaults: Mapping[str, Any] | None = None) -> str:
    """Every strategy with its parameters and their defaults (``defaults``, e.g. from Settings,
    over the strategy's own), and the spec that sets them: the one place they are listed."""
    lines = ["spec: NAME[:VALUE][:KEY=VALUE...], e.g. cacheblend:0.15:spread_v=0.5 (answer, query, "
             "the HTTP API's strategy field and Settings.strategy all take one)", ""]
    for name, cls in STRATEGIES.items():
        value_param = _SPEC_PARAMS[name][1] if name in _SPEC_PARAMS else None
        lines.append(name + (f"  ({name}:VALUE sets {value_param})" if value_param else ""))
        for f in dataclasses.fields(cls):
            value = (defaults or {}).get(f.name, f.default)
            lines.append(f"    {f.name} = {value!r}")
    lines.append("cacheblend-random:VALUE  (cacheblend with selection=random at that recompute_ratio)")
    return "\n".join(lines)


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = type(field.default)
    if kind is bool and isinstance(value, str):
        return value.lower() in {"1", "true", "yes", "on"}
    return kind(value) if kind in (int, float, str, bool) else value


__all__ = [
    "STRATEGIES", "spec_forms", "Ape", "CacheBlend", "Epic", "FullPrefill", "FusedCache", "FusionInput",
    "FusionResult", "FusionStrategy", "Reuse", "Sampling", "describe_strategies", "make_strategy",
    "parse_strategy_spec",
]
