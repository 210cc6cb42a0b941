"""A study is data: one TOML file under `studies/`, read into a `Study` and checked as a whole
before anything runs (one ValueError naming the file and the field).

    name, title, source            what it reproduces ("IBP paper, Table 3")
    dataset, model                 registry names
    baseline                       the label every method is tested against (rank-sum test)
    select_by                      "val_error" or "val_loss": how grid values are chosen
    train                          TrainConfig settings every run shares (only what differs from the defaults)
    deviations                     the study's deviations from the paper
    [[claims]]                     text (the paper's claim in words) and checks, each a comparison the
                                   report decides from the final runs: label, metric (the start of a
                                   results column: "test error", "noise error", "boundary median"),
                                   direction ("lower", "higher" or "similar"), against (a label;
                                   default the label's baseline), against_metric (default metric)
    [[methods]]                    label, method, params (fixed), grid (values chosen on validation:
                                   method parameters or training settings such as lr), train (this
                                   entry's own training settings: dropout, model, activation, ...),
                                   baseline (the label it is tested against; default the study's),
                                   series (the curve it belongs to in the error-against-size figure)
    [budgets.smoke|cpu|paper]      train (overrides the study's and each entry's), entry_train (per
                                   label, overrides the budget's train), methods (the labels this
                                   budget runs; default all), seeds, selection_seeds (how many of
                                   the seeds score each grid point; default 1), val_size, test_size,
                                   suites, settings (suite budgets, as `robustbp evaluate --set`),
                                   grid (per label, replacing the method's grid), deviations
    [paper]                        the paper's figures to print beside ours: label -> {column: text}

Model selection, as the papers did it: every grid value is trained once (the budget's first seed;
`selection_seeds` = k: the first k seeds, scored by their mean) on the training set less a
validation split (`val_size`) and scored by `select_by`; the chosen
values are then trained with every seed on the full training set, and the model after the last
epoch is evaluated on `test_size` test images with the budget's suites.
"""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = ("smoke", "cpu", "paper")
SELECT_BY = ("val_error", "val_loss")
STUDIES_DIR = Path(__file__).resolve().parent / "definitions"  # the repository's `studies/` links here


@dataclass(frozen=True)
class MethodEntry:
    """label: the report's name for it; method, params: the method and its fixed parameters;
    grid: values chosen on validation, method parameters or training settings (lr, batch_size);
    train: this entry's own training settings (dropout, model, activation, lr, train_size ...)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    series: str | None = None

    def grid_points(self, grid: dict[str, list] | None = None) -> list[dict[str, Any]]:
        """Every combination of the grid's values (one empty combination without a grid)."""
        grid = self.grid if grid is None else grid
        keys = sorted(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


DIRECTIONS = ("lower", "higher", "similar")


@dataclass(frozen=True)
class Check:
    """label's `metric` is `direction` than (or similar to) against's `against_metric`."""

    label: str
    metric: str
    direction: str
    against: str
    against_metric: str


@dataclass(frozen=True)
class Claim:
    text: str
    checks: list[Check]


@dataclass(frozen=True)
class Budget:
    name: str
    train: dict[str, Any]
    entry_train: dict[str, dict[str, Any]]
    methods: list[str]
    seeds: list[int]
    selection_seeds: int
    val_size: float
    test_size: int | None
    suites: list[str]
    settings: dict[str, Any]
    grid: dict[str, dict[str, list]]
    deviations: list[str]


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    source: str
    dataset: str
    model: str
    baseline: str
    select_by: str
    train: dict[str, Any]
    methods: list[MethodEntry]
    budgets: dict[str, Budget]
    deviations: list[str]
    claims: list[Claim]
    paper: dict[str, dict[str, str]]
    path: Path

    def method(self, label: str) -> MethodEntry:
        return next(entry for entry in self.methods if entry.label == label)

    def entries(self, budget: str) -> list[MethodEntry]:
        """The method entries this budget runs, in the study's order."""
        return [entry for entry in self.methods if entry.label in self.budgets[budget].methods]

    def baseline_of(self, label: str) -> str:
        """The label `label` is tested against: its entry's own baseline, else the study's."""
        return self.method(label).baseline or self.baseline

    def train_settings(self, label: str, budget: str) -> dict[str, Any]:
        """TrainConfig settings of an entry at a budget, before any grid point: the study's, the
        entry's, the budget's, then the budget's own for this entry."""
        return {"dataset": self.dataset, "model": self.model, **self.train, **self.method(label).train,
                **self.budgets[budget].train, **self.budgets[budget].entry_train.get(label, {})}

    def grid(self, label: str, budget: str) -> dict[str, list]:
        """The grid of one method at one budget (the budget's replacement, else the method's own)."""
        return self.budgets[budget].grid.get(label, self.method(label).grid)


def split_point(point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A grid point's method parameters and its training settings (TrainConfig fields)."""
    import dataclasses

    from robustbp.training import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return ({k: v for k, v in point.items() if k not in train_fields},
            {k: v for k, v in point.items() if k in train_fields})


def suite_settings(budget: Budget):
    """The evaluation suites' settings at this budget: the full settings with the budget's changes."""
    from robustbp.evaluate import FULL, override_settings

    def text(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return override_settings(FULL, [f"{name}={text(value)}" for name, value in budget.settings.items()])


def available(folder: Path = STUDIES_DIR) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.toml"))


def load(name_or_path: str | Path, folder: Path = STUDIES_DIR) -> Study:
    """Read and check a study by name (`studies/NAME.toml`) or path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = folder / f"{name_or_path}.toml"
        if not path.exists():
            raise ValueError(f"unknown study {str(name_or_path)!r}; available: {', '.join(available(folder))}")
    with open(path, "rb") as handle:
        try:
            raw = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from None
    try:
        return _study(raw, path)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: missing or malformed field {error}") from None


def _study(raw: dict, path: Path) -> Study:
    from robustbp import data, methods, models
    from robustbp.evaluate import SUITES
    from robustbp.training import TrainConfig

    def fail(message: str):
        raise ValueError(f"{path}: {message}")

    unknown = set(raw) - {"name", "title", "source", "dataset", "model", "baseline", "select_by", "train",
                          "methods", "budgets", "deviations", "claims", "paper"}
    if unknown:
        fail(f"unknown fields {sorted(unknown)}")
    if raw["name"] != path.stem:
        fail(f"name {raw['name']!r} differs from the file name {path.stem!r}")
    if raw["dataset"] not in data.available():
        fail(f"unknown dataset {raw['dataset']!r}")
    if raw["model"] not in models.available():
        fail(f"unknown model {raw['model']!r}")
    select_by = raw.get("select_by", "val_error")
    if select_by not in SELECT_BY:
        fail(f"select_by must be one of {SELECT_BY}, got {select_by!r}")
    entries = []
    for item in raw["methods"]:
        entry = MethodEntry(item["label"], item["method"], dict(item.get("params", {})), dict(item.get("grid", {})),
                            dict(item.get("train", {})), item.get("baseline"), item.get("series"))
        unknown_keys = set(item) - {"label", "method", "params", "grid", "train", "baseline", "series"}
        if unknown_keys:
            fail(f"method {item.get('label')!r}: unknown fields {sorted(unknown_keys)}")
        for point in entry.grid_points() or [{}]:
            method_point, train_point = split_point(point)
            try:
                methods.get(entry.method, **entry.params, **method_point)
                TrainConfig(**{"dataset": raw["dataset"], "model": raw["model"], **raw.get("train", {}),
                               **entry.train, **train_point})
            except (ValueError, TypeError) as error:
                fail(f"method {entry.label!r}: {error}")
        entries.append(entry)
    labels = [entry.label for entry in entries]
    if len(set(labels)) != len(labels):
        fail(f"method labels must be unique, got {labels}")
    if raw["baseline"] not in labels:
        fail(f"baseline {raw['baseline']!r} is not one of the methods' labels {labels}")
    for entry in entries:
        if entry.baseline is not None and entry.baseline not in labels:
            fail(f"method {entry.label!r}: baseline {entry.baseline!r} is not one of the labels {labels}")
    budgets = {}
    for name, item in raw["budgets"].items():
        if name not in BUDGETS:
            fail(f"unknown budget {name!r}; budgets are {BUDGETS}")
        unknown_keys = set(item) - {"train", "entry_train", "methods", "seeds", "selection_seeds", "val_size",
                                    "test_size", "suites", "settings", "grid", "deviations"}
        if unknown_keys:
            fail(f"budget {name}: unknown fields {sorted(unknown_keys)}")
        budget = Budget(name, dict(item.get("train", {})),
                        {label: dict(train) for label, train in item.get("entry_train", {}).items()},
                        list(item.get("methods", labels)), list(item["seeds"]), item.get("selection_seeds", 1),
                        item.get("val_size", 0.1), item.get("test_size"), list(item.get("suites", ["clean"])),
                        dict(item.get("settings", {})),
                        {label: dict(grid) for label, grid in item.get("grid", {}).items()},
                        list(item.get("deviations", [])))
        if not budget.seeds or len(set(budget.seeds)) != len(budget.seeds):
            fail(f"budget {name}: seeds must be distinct, got {budget.seeds}")
        if not isinstance(budget.selection_seeds, int) or not 1 <= budget.selection_seeds <= len(budget.seeds):
            fail(f"budget {name}: selection_seeds must be an integer from 1 to the number of seeds "
                 f"({len(budget.seeds)}), got {budget.selection_seeds!r}")
        for field_name, named in (("entry_train", budget.entry_train), ("methods", budget.methods)):
            if set(named) - set(labels):
                fail(f"budget {name}: {field_name} names unknown labels {sorted(set(named) - set(labels))}")
        if not budget.methods:
            fail(f"budget {name}: methods is empty")
        for label in budget.methods:
            baseline = next(entry for entry in entries if entry.label == label).baseline or raw["baseline"]
            if baseline not in budget.methods:
                fail(f"budget {name}: runs {label!r} but not its baseline {baseline!r}")
        if set(budget.suites) - set(SUITES):
            fail(f"budget {name}: unknown suites {sorted(set(budget.suites) - set(SUITES))}; available: {SUITES}")
        if set(budget.grid) - set(labels):
            fail(f"budget {name}: grids for unknown labels {sorted(set(budget.grid) - set(labels))}")
        try:
            suite_settings(budget)
            for entry in entries:
                TrainConfig(**{"dataset": raw["dataset"], "model": raw["model"], **raw.get("train", {}),
                               **entry.train, **budget.train, **budget.entry_train.get(entry.label, {})})
        except (ValueError, TypeError) as error:
            fail(f"budget {name}: {error}")
        budgets[name] = budget
    missing = set(BUDGETS) - set(budgets)
    if missing:
        fail(f"every study needs the budgets {BUDGETS}; missing {sorted(missing)}")
    return Study(raw["name"], raw["title"], raw["source"], raw["dataset"], raw["model"], raw["baseline"], select_by,
                 dict(raw.get("train", {})), entries, budgets, list(raw.get("deviations", [])),
                 [_claim(item, entries, raw["baseline"], fail) for item in raw.get("claims", [])],
                 {k: dict(v) for k, v in raw.get("paper", {}).items()}, path)


def _claim(item: dict, entries: list[MethodEntry], baseline: str, fail) -> Claim:
    labels = {entry.label: entry for entry in entries}
    unknown = set(item) - {"text", "checks"}
    if unknown:
        fail(f"claim {item.get('text', '')[:40]!r}: unknown fields {sorted(unknown)}")
    checks = []
    for check in item.get("checks", []):
        unknown = set(check) - {"label", "metric", "direction", "against", "against_metric"}
        if unknown:
            fail(f"claim {item['text'][:40]!r}: a check has unknown fields {sorted(unknown)}")
        label = check["label"]
        if label not in labels:
            fail(f"claim {item['text'][:40]!r}: unknown label {label!r}")
        against = check.get("against") or labels[label].baseline or baseline
        if against == label and check.get("against_metric", check["metric"]) == check["metric"]:
            fail(f"claim {item['text'][:40]!r}: a check compares {label!r} with itself")
        if against not in labels:
            fail(f"claim {item['text'][:40]!r}: unknown label {against!r}")
        if check["direction"] not in DIRECTIONS:
            fail(f"claim {item['text'][:40]!r}: direction must be one of {DIRECTIONS}, got {check['direction']!r}")
        checks.append(Check(label, check["metric"], check["direction"], against,
                            check.get("against_metric", check["metric"])))
    return Claim(item["text"], checks)
