"""Catalog files: meters, plans, priced actions, and an optional demo seed."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from quotagate.errors import ConfigError
from quotagate.ledger.model import Allowance, Catalog, Charge, MeterKind

MAX_AMOUNT = 2**50


@dataclass(frozen=True)
class Seed:
    """Orgs, teams, seats, assistants and top-ups applied at start (idempotently)."""

    orgs: tuple[dict[str, Any], ...] = ()
    teams: tuple[dict[str, Any], ...] = ()
    seats: tuple[dict[str, Any], ...] = ()
    assistants: tuple[dict[str, Any], ...] = ()
    topups: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class CatalogFile:
    catalog: Catalog
    seed: Seed = field(default_factory=Seed)


def _amount(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_AMOUNT:
        raise ConfigError(f"must be an integer from 0 to 2^50, got {value!r}", where)
    return value


def parse(data: dict[str, Any], source: str = "catalog") -> CatalogFile:
    meters: dict[str, MeterKind] = {}
    quiet: set[str] = set()
    for name, spec in (data.get("meters") or {}).items():
        kind = (spec or {}).get("kind", "counter")
        if kind not in ("counter", "gauge"):
            raise ConfigError(f"kind must be 'counter' or 'gauge', got {kind!r}",
                              f"{source}: meters.{name}.kind")
        meters[name] = MeterKind.COUNTER if kind == "counter" else MeterKind.GAUGE
        deact = (spec or {}).get("deactivates_assistants", kind == "counter")
        if not isinstance(deact, bool):
            raise ConfigError(f"must be true or false, got {deact!r}",
                              f"{source}: meters.{name}.deactivates_assistants")
        if not deact:
            quiet.add(name)
    if not meters:
        raise ConfigError("at least one meter is required", f"{source}: meters")

    def known(meter: str, where: str) -> str:
        if meter not in meters:
            raise ConfigError(f"unknown meter {meter!r}", where)
        return meter

    plans: dict[str, tuple[Allowance, ...]] = {}
    for name, spec in (data.get("plans") or {}).items():
        allowances = []
        for meter, a in (spec.get("allowances") or {}).items():
            where = f"{source}: plans.{name}.allowances.{meter}"
            allowances.append(Allowance(known(meter, where),
                                        _amount(a.get("monthly", 0), where + ".monthly"),
                                        _amount(a.get("per_seat", 0), where + ".per_seat"),
                                        _amount(a.get("one_time", 0), where + ".one_time")))
        plans[name] = tuple(allowances)

    actions: dict[str, tuple[Charge, ...]] = {}
    for name, spec in (data.get("actions") or {}).items():
        charges = []
        for meter, amount in (spec.get("charges") or {}).items():
            where = f"{source}: actions.{name}.charges.{meter}"
            charges.append(Charge(known(meter, where), _amount(amount, where)))
        if not charges:
            raise ConfigError("an action needs at least one charge", f"{source}: actions.{name}")
        actions[name] = tuple(charges)

    default = data.get("default_meter", "message_tokens" if "message_tokens" in meters
                       else next(iter(meters)))
    known(default, f"{source}: default_meter")
    seed = data.get("seed") or {}
    return CatalogFile(
        Catalog(meters, plans, actions, default, frozenset(quiet)),
        Seed(*(tuple(seed.get(k) or ()) for k in
               ("orgs", "teams", "seats", "assistants", "topups"))),
    )


def load(path: str | None) -> CatalogFile:
    """The catalog at `path`, or the built-in one when `path` is empty."""
    if not path:
        text = resources.files(__package__).joinpath("default.toml").read_text("utf-8")
        return parse(tomllib.loads(text), "built-in catalog")
    try:
        text = Path(path).read_text("utf-8")
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read catalog {path}: {e}", "QUOTAGATE_CATALOG") from e
    return parse(data, path)


__all__ = ["CatalogFile", "Seed", "load", "parse"]
