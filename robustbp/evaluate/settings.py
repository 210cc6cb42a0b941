"""SuiteSettings: every registered suite's budgets in one frozen dataclass (FULL, QUICK), and `--set` overrides."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from robustbp.evaluate.suites import REGISTRY, Setting

GENERAL = {"max_points": Setting(full=None, quick=256, none_means_all=True)}  # the first N images (None: all)


def _every_setting() -> dict[str, Setting]:
    """GENERAL and every registered suite's settings, by name; a name two suites declare is refused."""
    settings = dict(GENERAL)
    for suite in REGISTRY.values():
        clash = set(settings) & set(suite.settings)
        if clash:
            raise RuntimeError(f"suite {suite.name!r} declares settings already taken: {', '.join(sorted(clash))}")
        settings.update(suite.settings)
    return settings


ALL_SETTINGS = _every_setting()


def _field(name: str, setting: Setting) -> tuple:
    kind = type(setting.full) if setting.full is not None else int
    return name, kind | None if setting.none_means_all else kind, dataclasses.field(default=setting.full)


SuiteSettings = dataclasses.make_dataclass(
    "SuiteSettings", [_field(name, setting) for name, setting in ALL_SETTINGS.items()], frozen=True,
    namespace={"__module__": __name__},
)
SuiteSettings.__doc__ = ("Budgets of every suite, one field per setting a suite declares (`--set NAME=VALUE`). "
                         "FULL follows the papers; QUICK runs in seconds on small models.")
FULL = SuiteSettings()
QUICK = SuiteSettings(**{name: setting.value(quick=True) for name, setting in ALL_SETTINGS.items()})


def override_settings(base: SuiteSettings, assignments: Sequence[str]) -> SuiteSettings:
    """`base` with fields replaced from "name=value" strings, as `robustbp evaluate --set` gives
    them: a tuple field takes a comma-separated list, an optional count takes "none". Every
    number must be finite and non-negative (ε, σ, steps, sizes); counts must be whole numbers."""
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in ALL_SETTINGS:
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(ALL_SETTINGS)}")
        changes[name] = _parse(name, text, ALL_SETTINGS[name])
    return dataclasses.replace(base, **changes)


def _parse(name: str, text: str, setting: Setting):
    """The value of `--set name=text`, of the kind of the setting's full value."""
    default, optional = setting.full, setting.none_means_all
    whole = optional or isinstance(default, int) or (
        isinstance(default, tuple) and all(isinstance(v, int) for v in default)
    )
    parse = int if whole else float
    try:
        if optional and text.strip().lower() == "none":
            value = None
        elif isinstance(default, tuple):
            value = tuple(parse(part) for part in text.split(",") if part.strip())
        else:
            value = parse(text)
    except ValueError:
        raise ValueError(f"--set {name}: {text!r} is not {'a whole number' if whole else 'a number'}"
                         f"{' list' if isinstance(default, tuple) else ''}") from None
    numbers = value if isinstance(value, tuple) else () if value is None else (value,)
    if not numbers and isinstance(default, tuple):
        raise ValueError(f"--set {name}: give at least one value")
    bad = [v for v in numbers if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"--set {name}: values must be finite and non-negative, got {bad[0]}")
    return value
