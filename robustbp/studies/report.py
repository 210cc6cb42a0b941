"""A study's report at one budget: `report.md` and its PNG figures, from the runs in the store.

    write_report(study, budget, runs, out_dir) -> out_dir/report.md (figures beside it)
    report_markdown(study, budget, runs) -> the markdown text (no files)

`runs` are the store's records (`ResultStore(path).runs(study.name)`); only those of this study
and budget are read. The report says where the numbers come from and decides nothing the numbers
cannot decide:

1. the study, the budget, every deviation from the paper, the runs (finished, failed with their
   errors, final runs still missing), and the robustbp/torch versions and hosts that made them;
2. the hyperparameters model selection chose (`runner.chosen_params`), by what, and every
   candidate's score;
3. the main table, one row per method (baseline first): test error % (mean ± sd over seeds), each
   suite's headline number, seconds per epoch and its ratio to the baseline's, and the exact
   two-sided Wilcoxon rank-sum test against the baseline on test error (★: p < 0.05, no
   correction for multiple comparisons, as in the papers);
4. the paper's figures beside ours;
5. one sentence per method, metric and baseline ("X is lower than B by D points (p = …):
   significant / not significant / undecidable (n < 4)"), and each of the paper's claims with its
   verdict (reproduced, not reproduced, not decidable at this budget) from the study's checks;
6. figures where there is data: test error per method, error against noise σ, attack success
   against ε or steps, training loss per epoch.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robustbp.io import write_text
from robustbp.studies.definition import Study, suite_settings
from robustbp.studies.statistics import rank_sum, summary

ALPHA = 0.05
MIN_SEEDS = 4  # with 3 seeds against 3 the exact rank-sum test cannot reach p < 0.05 (its smallest p is 0.1)
TEST_ERROR = "test error %"
SECONDS = "s/epoch"


@dataclass
class Metric:
    """One number per seed and per method label: the values, in the order of the runs' seeds."""

    name: str
    unit: str  # "points" (percent), "s", or "" (e.g. an L2 distance): the unit of a difference
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.values.setdefault(label, []).append(float(value))


# ---------------------------------------------------------------- the runs


def _budget_runs(study: Study, budget: str, runs: Sequence[dict]) -> list[dict]:
    """This study's runs at this budget (by config["budget"], else by the key's first part)."""
    def run_budget(run: dict) -> str | None:
        config = run.get("config") or {}
        return config.get("budget", str(run.get("key", "")).split("/", 1)[0])

    return [run for run in runs if run.get("study", study.name) == study.name and run_budget(run) == budget]


def _phase(run: dict) -> str | None:
    config = run.get("config") or {}
    if "phase" in config:
        return config["phase"]
    parts = str(run.get("key", "")).split("/")
    return parts[1] if len(parts) > 1 else None


def _label(run: dict) -> str | None:
    config = run.get("config") or {}
    if "label" in config:
        return config["label"]
    parts = str(run.get("key", "")).split("/")
    return parts[2] if len(parts) > 2 else None


def _final_runs(study: Study, budget: str, runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Finished final runs by label (the budget's entries, study order), each label's runs sorted by seed."""
    by_label: dict[str, list[dict]] = {entry.label: [] for entry in study.entries(budget)}
    for run in runs:
        if run.get("status") == "finished" and _phase(run) == "final" and _label(run) in by_label:
            by_label[_label(run)].append(run)
    for label in by_label:
        by_label[label].sort(key=lambda run: (run.get("seed") is None, run.get("seed")))
    return by_label


def _ordered_labels(study: Study, budget: str) -> list[str]:
    """The study's baseline first (where the budget runs it), then the budget's other entries in the study's order."""
    labels = [entry.label for entry in study.entries(budget)]
    return sorted(labels, key=lambda label: label != study.baseline)


def _compared(study: Study, budget: str) -> list[tuple[str, str]]:
    """(label, its baseline) for every entry tested against another one."""
    return [(label, study.baseline_of(label)) for label in _ordered_labels(study, budget)
            if study.baseline_of(label) != label]


def _suites(run: dict) -> dict:
    results = run.get("results") or {}
    return results.get("suites") or {}


def _test_error(run: dict) -> tuple[float | None, str]:
    """Test error in percent and where it came from: the clean suite if evaluated, else the last
    epoch's history."""
    clean = _suites(run).get("clean")
    if clean is not None:
        if "accuracy" in clean and clean["accuracy"] is not None:
            return 100 * (1 - clean["accuracy"]), "clean"
        if clean.get("error") is not None:
            return 100 * clean["error"], "clean"
    history = run.get("history") or []
    if history and history[-1].get("test_error") is not None:
        return float(history[-1]["test_error"]), "history"
    return None, "none"


# ---------------------------------------------------------------- the suites' headline numbers


def _eps_label(eps: float) -> str:
    from robustbp.evaluate.suites.base import eps_label

    return eps_label(eps)


def _settings_of(study: Study, budget: str, run: dict, suite: str) -> dict:
    """A suite's settings in the form its result has them: from the run's results when the runner
    recorded them (results["settings"][suite]), else from the budget's suite settings."""
    recorded = ((run.get("results") or {}).get("settings") or {}).get(suite)
    if recorded is not None:
        return recorded
    s = suite_settings(study.budgets[budget])
    if suite == "pgd":
        from robustbp.evaluate.suites.pgd import attacks

        return {"attacks": attacks(s), "steps": list(s.pgd_steps)}
    if suite == "linbp":
        return {"eps": list(s.linbp_eps), "steps": list(s.linbp_steps)}
    if suite == "apgd":
        return {"eps": list(s.apgd_eps), "steps": s.apgd_steps}
    return {}


def _at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """ys at the position of x in xs (None if x is not there)."""
    for xi, yi in zip(xs, ys):
        if abs(xi - x) < 1e-12:
            return yi
    return None


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _headlines(suite: str, m: dict, settings: dict) -> list[tuple[str, str, float | None]]:
    """(column, unit, value) of one model's numbers in one suite: error at the largest σ, attack
    success at the largest ε or budget, the median distance to the boundary, ..."""
    if suite == "noise" and m.get("sigma"):
        sigma = max(m["sigma"])
        return [(f"noise error % (σ={sigma:g})", "points", _percent(_at(m["sigma"], m["error"], sigma)))]
    if suite == "fgsm" and m.get("sign", {}).get("eps"):
        curve = m["sign"]
        eps = max(curve["eps"])
        return [(f"FGSM success % (ε={_eps_label(eps)})", "points",
                 _percent(_at(curve["eps"], curve["attack_success_rate"], eps)))]
    if suite == "pgd":
        out = []
        for attack in settings.get("attacks", []):
            curve = m.get(attack["attack"])
            if curve and curve.get("steps"):
                steps = max(curve["steps"])
                name = {"pgd_linf": "PGD-Linf", "pgd_l2": "PGD-L2", "tpgd": "TPGD"}.get(attack["attack"],
                                                                                      attack["attack"])
                eps = _eps_label(attack["eps"]) if attack["norm"] == "linf" else f"{attack['eps']:g}"
                out.append((f"{name} success % (ε={eps}, {steps} steps)", "points",
                            _percent(_at(curve["steps"], curve["attack_success_rate"], steps))))
        return out
    if suite == "linbp" and settings.get("eps") and settings.get("steps"):
        eps, steps = settings["eps"][-1], settings["steps"][-1]
        return [(f"PGD-{'BP' if g == 'bp' else 'LinBP'} success % (ε={_eps_label(eps)}, {steps} steps)", "points",
                 _percent(m[g]["attack_success_rate"][-1][-1])) for g in ("bp", "linbp") if g in m]
    if suite == "apgd" and settings.get("eps"):
        eps = settings["eps"][-1]
        return [(f"APGD-{'BP' if g == 'bp' else 'LinBP'} success % (ε={_eps_label(eps)})", "points",
                 _percent(m[g]["attack_success_rate"][-1])) for g in ("bp", "linbp") if g in m]
    if suite == "square" and m.get("queries"):
        queries = max(m["queries"])
        return [(f"Square success % ({queries} queries)", "points",
                 _percent(_at(m["queries"], m["attack_success_rate"], queries)))]
    if suite == "boundary" and "median" in m:
        return [("boundary median L2", "", m["median"])]
    if suite == "spectral" and "error" in m:
        e = m["error"]
        return [(f"spectral rel. error ({e['n_iter'][-1]} it.)", "", e["estimate_rel_error_mean"][-1]),
                ("bound rel. error", "", e.get("bound_rel_error_mean"))]
    return []


def _metrics(study: Study, budget: str, finals: dict[str, list[dict]]) -> tuple[list[Metric], dict[str, str]]:
    """Test error, each suite's headline numbers and seconds per epoch, per label over the final
    runs; and the test error's source per label ("clean", "history" or both)."""
    test, seconds = Metric(TEST_ERROR, "points"), Metric(SECONDS, "s")
    suite_metrics: dict[str, Metric] = {}
    sources: dict[str, set[str]] = {}
    suite_order = list(study.budgets[budget].suites)
    for label, runs in finals.items():
        for run in runs:
            value, source = _test_error(run)
            test.add(label, value)
            if value is not None:
                sources.setdefault(label, set()).add(source)
            seconds.add(label, run.get("seconds_per_epoch"))
            suites = _suites(run)
            for suite in suite_order + sorted(set(suites) - set(suite_order)):
                if suite == "clean" or suite not in suites:
                    continue
                for column, unit, value in _headlines(suite, suites[suite], _settings_of(study, budget, run, suite)):
                    suite_metrics.setdefault(column, Metric(column, unit)).add(label, value)
    return [test, *suite_metrics.values(), seconds], {label: "+".join(sorted(s)) for label, s in sources.items()}


# ---------------------------------------------------------------- formatting


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _digits(metric: Metric) -> int:
    return 2 if metric.unit == "points" else 3 if metric.unit == "s" else 4


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "–"
    mean, sd, _ = summary(values)
    return f"{mean:.{digits}f} ± {_number(sd, digits)}"


def _score(score: float | None) -> str:
    """A selection score; a failed selection run scores infinity (never chosen)."""
    if score is not None and math.isinf(score):
        return "failed"
    return _number(score, 4)


def _p(p_value: float) -> str:
    return f"{p_value:.4g}"


def _params(params: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items())) or "–"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


# ---------------------------------------------------------------- the sections


def _header(study: Study, budget: str, runs: list[dict], finals: dict[str, list[dict]]) -> list[str]:
    b = study.budgets[budget]
    finished = [run for run in runs if run.get("status") == "finished"]
    failed = [run for run in runs if run.get("status") == "failed"]
    lines = [f"# {study.title}", "",
             f"- study: `{study.name}` ({study.path.name})",
             f"- source: {study.source}",
             f"- budget: **{budget}** — seeds {b.seeds}, validation split {b.val_size}, "
             f"test images {b.test_size if b.test_size is not None else 'all'}, suites {', '.join(b.suites)}",
             f"- dataset `{study.dataset}`, model `{study.model}`, baseline **{study.baseline}**, "
             f"model selection by `{study.select_by}` ({_selection_seeds(b)})", "",
             "## Deviations from the paper", ""]
    deviations = [f"{text} (study)" for text in study.deviations] + [f"{text} ({budget} budget)"
                                                                     for text in b.deviations]
    lines += [f"- {text}" for text in deviations] or ["- none recorded"]
    n_select = sum(1 for run in finished if _phase(run) == "select")
    n_final = sum(1 for run in finished if _phase(run) == "final")
    lines += ["", "## Runs", "",
              f"- {len(finished)} finished ({n_select} model selection, {n_final} final), {len(failed)} failed"]
    missing = [f"{label} seed={seed}" for label in _ordered_labels(study, budget)
               for seed in b.seeds if seed not in {run.get("seed") for run in finals.get(label, [])}]
    if missing:
        lines.append(f"- final runs not finished ({len(missing)}): {', '.join(missing)}")
    for run in failed:
        lines.append(f"- failed: `{run.get('key')}`: {run.get('error')}")

    def seen(name: str) -> str:
        return ", ".join(sorted({str(run.get(name)) for run in runs if run.get(name) is not None})) or "–"

    lines += [f"- robustbp {seen('robustbp_version')}; torch {seen('torch_version')}; hosts {seen('host')}"]
    return lines


def _selection_seeds(budget) -> str:
    k = budget.selection_seeds
    return "one run per grid value, the budget's first seed" if k == 1 else \
        f"the mean over the budget's first {k} seeds per grid value"


def _selection(study: Study, budget: str, runs: list[dict], finals: dict[str, list[dict]],
               chosen: dict[str, dict] | None) -> list[str]:
    lines = ["", "## Chosen hyperparameters", ""]
    if chosen is None:
        from robustbp.studies.runner import chosen_params

        chosen = chosen_params(study, budget, runs)
    rows, details, edge_notes = [], [], []
    for label in _ordered_labels(study, budget):
        entry = study.method(label)
        grid = study.grid(label, budget)
        choice = chosen.get(label)
        used = sorted({_params((run.get("config") or {}).get("params")) for run in finals.get(label, [])})
        if not grid:
            rows.append([label, entry.method, _params(entry.params), "no grid", "–", "–", "; ".join(used) or "–"])
            continue
        if choice is None:
            mine = [run for run in runs if _phase(run) == "select" and _label(run) == label]
            failed = sum(1 for run in mine if run.get("status") == "failed")
            n_points = len(entry.grid_points(grid))
            rows.append([label, entry.method, _params(entry.params),
                         f"not chosen ({len(mine)} of {n_points} selection runs recorded, {failed} failed)",
                         "–", "–", "; ".join(used) or "–"])
            continue
        edges = _grid_edges(grid, choice["params"])
        if edges:
            edge_notes.append(f"{label}: {', '.join(edges)}")
        rows.append([label, entry.method, _params(entry.params),
                     _params(choice["params"]) + (" (grid edge)" if edges else ""),
                     choice.get("by") or "–", _score(choice.get("score")), "; ".join(used) or "–"])
        candidates = [f"{_params(params)} → {_score(score)}"
                      + (" (chosen)" if params == choice["params"] else "")
                      for params, score in choice.get("candidates", [])]
        details.append(f"- {label} (by {choice.get('by', '–')}): " + "; ".join(candidates))
    lines += _table(["method", "name", "fixed", "chosen", "by", "score", "final runs used"], rows)
    if edge_notes:
        lines += ["", f"Chosen at the edge of the grid ({len(edge_notes)} of {len(rows)}): the best value may lie "
                      "outside the grid, so these methods may be under- or over-regularized here — "
                      + "; ".join(edge_notes) + "."]
    if details:
        lines += ["", f"Candidates ({_selection_seeds(study.budgets[budget])}, validation split):", "", *details]
    return lines


def _grid_edges(grid: dict[str, list], chosen: dict) -> list[str]:
    """'beta=0.001 (the smallest of 3)' for each numeric grid setting of three or more values
    whose chosen value is the grid's smallest or largest."""
    edges = []
    for name, values in sorted(grid.items()):
        numbers = sorted({v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if len(numbers) >= 3 and chosen.get(name) in (numbers[0], numbers[-1]):
            end = "smallest" if chosen[name] == numbers[0] else "largest"
            edges.append(f"{name}={chosen[name]} (the {end} of {len(numbers)})")
    return edges


@dataclass
class Comparison:
    """label's values of one metric against another label's (or another metric's), decided or not:
    state "decided" (n >= MIN_SEEDS each, p < ALPHA, difference beyond the larger sd), "few",
    "not significant" or "within spread"."""

    text: str  # "X is lower than Y in M by D (a ± s against b ± s, n = .., p = ..)"
    difference: float
    spread: float  # the larger of the two standard deviations
    state: str


def _compare(ours: Metric, label: str, theirs: Metric, against: str) -> Comparison | None:
    mine, other = ours.values.get(label, []), theirs.values.get(against, [])
    if not mine or not other:
        return None
    mean, sd, n = summary(mine)
    base_mean, base_sd, base_n = summary(other)
    test = rank_sum(mine, other, ALPHA)
    difference, digits = mean - base_mean, _digits(ours)
    unit = f" {ours.unit}" if ours.unit else ""
    where = ours.name if ours is theirs else f"{ours.name} against {against}'s {theirs.name}"
    if round(abs(difference), digits) == 0:
        compared = f"is level with {against} in {where}"
    else:
        direction = "lower" if difference < 0 else "higher"
        compared = f"is {direction} than {against} in {where} by {abs(difference):.{digits}f}{unit}"
        if ours.name == TEST_ERROR and ours is theirs and base_mean > 0:
            compared += f" ({100 * abs(difference) / base_mean:.1f}% relative)"
    text = (f"{label} {compared} ({_mean_sd(mine, digits)} against {_mean_sd(other, digits)}, "
            f"n = {n} against {base_n}, p = {_p(test.p_value)})")
    spread = max((s for s in (sd, base_sd) if not math.isnan(s)), default=math.nan)
    if n < MIN_SEEDS or base_n < MIN_SEEDS:
        return Comparison(text + f": undecidable (n < {MIN_SEEDS})", difference, spread, "few")
    if not test.significant:
        return Comparison(text + ": not significant", difference, spread, "not significant")
    if abs(difference) < spread:
        return Comparison(text + f": significant, but smaller than the seeds' spread (sd {spread:.{digits}f})",
                          difference, spread, "within spread")
    return Comparison(text + ": significant", difference, spread, "decided")


def _sentence(metric: Metric, label: str, baseline: str) -> str | None:
    comparison = _compare(metric, label, metric, baseline)
    if comparison is None:
        return None
    return comparison.text + ("." if comparison.state == "decided" else " — cannot be decided at this budget.")


REPRODUCED, NOT_REPRODUCED, UNDECIDABLE = "reproduced", "not reproduced", "not decidable at this budget"


def _check_verdicts(check, metrics: list[Metric]) -> list[tuple[str, str]]:
    """(verdict, sentence) of one check, one per results column its metric names (a metric like
    "PGD" may name several columns; each must hold)."""
    columns = [m for m in metrics if m.name.startswith(check.metric)]
    if check.against_metric == check.metric:
        pairs = [(m, m) for m in columns]
    else:
        others = [m for m in metrics if m.name.startswith(check.against_metric)]
        pairs = list(zip(columns[:1], others[:1]))
    if not pairs:
        return [(UNDECIDABLE, f"{check.label} against {check.against}: no results column named "
                              f"{check.metric!r}{'' if check.against_metric == check.metric else ' or ' + repr(check.against_metric)}"
                              " at this budget")]
    verdicts = []
    for ours, theirs in pairs:
        comparison = _compare(ours, check.label, theirs, check.against)
        if comparison is None:
            verdicts.append((UNDECIDABLE, f"{check.label} or {check.against} has no final runs with {ours.name}"))
            continue
        if check.direction == "similar":
            if comparison.state == "decided":
                verdict = NOT_REPRODUCED
            elif comparison.state == "not significant" and abs(comparison.difference) <= comparison.spread:
                verdict = REPRODUCED
            else:
                verdict = UNDECIDABLE
        elif comparison.state != "decided":
            verdict = UNDECIDABLE
        else:
            verdict = REPRODUCED if (comparison.difference < 0) == (check.direction == "lower") else NOT_REPRODUCED
        verdicts.append((verdict, f"{comparison.text} (claimed: {check.direction})"))
    return verdicts


def claim_verdict(claim, metrics: list[Metric]) -> tuple[str, list[tuple[str, str]]]:
    """A claim is reproduced when every check is, not reproduced when any check is decided the
    other way, and not decidable at this budget otherwise (or when it has no checks)."""
    checks = [verdict for check in claim.checks for verdict in _check_verdicts(check, metrics)]
    states = {verdict for verdict, _ in checks}
    if not checks:
        return UNDECIDABLE, []
    if NOT_REPRODUCED in states:
        return NOT_REPRODUCED, checks
    return (REPRODUCED if states == {REPRODUCED} else UNDECIDABLE), checks


def _main_table(study: Study, budget: str, metrics: list[Metric], sources: dict[str, str]) -> list[str]:
    test, *suite_metrics, seconds = metrics
    own_baselines = any(study.baseline_of(label) != study.baseline for label in _ordered_labels(study, budget))
    headers = ["method", "seeds", TEST_ERROR, *(m.name for m in suite_metrics), SECONDS, "× baseline",
               "p (test error)", ""]
    rows = []
    for label in _ordered_labels(study, budget):
        baseline = study.baseline_of(label)
        base_seconds = seconds.values.get(baseline, [])
        errors = test.values.get(label, [])
        name = label + (" (baseline)" if label == baseline else f" (vs {baseline})" if own_baselines else "")
        row = [name, len(errors), _mean_sd(errors)]
        row += [_mean_sd(m.values.get(label, []), _digits(m)) for m in suite_metrics]
        ours = seconds.values.get(label, [])
        row.append(_mean_sd(ours, 3))
        row.append(f"{summary(ours)[0] / summary(base_seconds)[0]:.2f}×" if ours and base_seconds else "–")
        if label != baseline and errors and test.values.get(baseline):
            result = rank_sum(errors, test.values[baseline], ALPHA)
            row += [_p(result.p_value), "★" if result.significant else ""]
        else:
            row += ["–", ""]
        rows.append(row)
    lines = ["", "## Results", "", *_table(headers, rows), "",
             "Mean ± sample standard deviation over the seeds of the final runs (chosen hyperparameters, full "
             "training set, the model after the last epoch). p: exact two-sided Wilcoxon rank-sum "
             "(Mann–Whitney U) test against the baseline on test error; ★: p < 0.05. "
             "No correction for multiple comparisons is applied, as in the papers."]
    from_history = [label for label, source in sources.items() if "history" in source]
    if from_history:
        lines.append("Test error from the last epoch's history (no clean suite result) for: "
                     f"{', '.join(from_history)}.")
    return lines


def _paper_table(study: Study, metrics: list[Metric]) -> list[str]:
    lines = ["", "## The paper's figures beside ours", ""]
    if not study.paper:
        return lines + ["The study records no figures from the paper."]
    columns = list(dict.fromkeys(column for figures in study.paper.values() for column in figures))
    ours = [m for m in metrics if any(m.values.values())]
    if ours and ours[0].name == TEST_ERROR:  # the papers mostly give accuracy: 100 - error, the same spread
        accuracy = Metric("test accuracy %", "points",
                          {label: [100 - e for e in errors] for label, errors in ours[0].values.items()})
        ours.insert(1, accuracy)
    rows = []
    for label, figures in study.paper.items():
        known = any(entry.label == label for entry in study.methods)
        rows.append([label, *(figures.get(column, "–") for column in columns),
                     *((_mean_sd(m.values.get(label, []), _digits(m)) if known else "not in this study")
                       for m in ours)])
    return lines + _table(["method", *(f"paper: {c}" for c in columns), *(f"ours: {m.name}" for m in ours)], rows)


def _claims(study: Study, budget: str, metrics: list[Metric]) -> list[str]:
    lines = ["", "## Each method against the baseline", "",
             f"A difference is decided only with at least {MIN_SEEDS} seeds on each side (with 3 against 3 the "
             "exact test cannot reach p < 0.05), p < 0.05, and a difference larger than the seeds' spread (the "
             "larger standard deviation); otherwise it cannot be decided at this budget.", ""]
    sentences = [sentence for metric in metrics for label, baseline in _compared(study, budget)
                 if (sentence := _sentence(metric, label, baseline)) is not None]
    lines += [f"- {s}" for s in sentences] or ["- no method has final runs beside the baseline's yet."]
    lines += ["", "## The paper's claims", "",
              "Each claim is decided by its checks, comparisons of the final runs decided as above: reproduced "
              "when every check is decided in the claimed direction (a claim of similarity: no significant "
              "difference and the means within the seeds' spread), not reproduced when any check is decided "
              "the other way, otherwise not decidable at this budget.", ""]
    for claim in study.claims:
        verdict, checks = claim_verdict(claim, metrics)
        lines.append(f"- {claim.text} — **{verdict}**"
                     + ("" if checks else " (no check of it can be computed from these suites)"))
        lines += [f"    - {check_verdict}: {sentence}" for check_verdict, sentence in checks]
    if not study.claims:
        lines.append("- the study states no claims.")
    return lines


# ---------------------------------------------------------------- figures


def _curves(finals: dict[str, list[dict]], points: Callable[[dict], dict[float, float] | None]
            ) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """label -> (x, mean y, sd y) over the seeds, from points(run) -> {x: y} (None: no data)."""
    curves = {}
    for label, runs in finals.items():
        by_x: dict[float, list[float]] = {}
        for run in runs:
            for x, y in (points(run) or {}).items():
                if y is not None and math.isfinite(y):
                    by_x.setdefault(x, []).append(y)
        if by_x:
            xs = sorted(by_x)
            stats = [summary(by_x[x]) for x in xs]
            curves[label] = (xs, [s[0] for s in stats], [0.0 if math.isnan(s[1]) else s[1] for s in stats])
    return curves


def _plot_curves(axis, curves, **style) -> None:
    for label, (xs, means, sds) in curves.items():
        axis.errorbar(xs, means, yerr=sds, marker=style.get("marker", "o"), capsize=3,
                      linestyle=style.get("linestyle", "-"), label=f"{label}{style.get('suffix', '')}")


def _error_by_size(study: Study, budget: str, finals: dict[str, list[dict]], test: Metric
                   ) -> dict[str, tuple[list[int], list[str]]]:
    """series -> (training sizes, labels) for every series with final runs at two sizes or more."""
    series: dict[str, list[tuple[int, str]]] = {}
    for entry in study.entries(budget):
        sizes = {((run.get("config") or {}).get("train") or {}).get("train_size") for run in finals.get(entry.label, [])}
        if entry.series and test.values.get(entry.label) and len(sizes) == 1 and None not in sizes:
            series.setdefault(entry.series, []).append((sizes.pop(), entry.label))
    return {name: ([size for size, _ in sorted(points)], [label for _, label in sorted(points)])
            for name, points in series.items() if len({size for size, _ in points}) >= 2}


def _relative_improvement(test: Metric, label: str, baseline: str) -> float:
    """100 (e_baseline − e) / e_baseline, on the means over seeds (the IBP paper's Fig. 2 measure)."""
    base = summary(test.values[baseline])[0]
    return 100 * (base - summary(test.values[label])[0]) / base


def _figures(study: Study, budget: str, finals: dict[str, list[dict]], metrics: list[Metric], out_dir: Path
             ) -> list[tuple[str, str]]:
    """Write the figures there is data for; (file name, caption) of each."""
    from robustbp.evaluate.report import new_figure, write_png

    written = []

    def save(figure, name: str, caption: str) -> None:
        write_png(out_dir / name, figure)
        written.append((name, caption))

    def bars(metric: Metric, ylabel: str, title: str, name: str, caption: str) -> None:
        labels = [label for label in _ordered_labels(study, budget) if metric.values.get(label)]
        if not labels:
            return
        figure, (axis,) = new_figure(width_per_panel=max(4.5, 1.6 * len(labels)))
        stats = [summary(metric.values[label]) for label in labels]
        axis.bar(range(len(labels)), [s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
                 capsize=4)
        axis.set_xticks(range(len(labels)), labels, rotation=15)
        axis.set(ylabel=ylabel, title=f"{budget} budget: {title} (mean ± sd over seeds)")
        save(figure, name, caption)

    test = metrics[0]
    bars(test, "test error %", "test error", "test_error.png", "Test error per method (mean ± sd over seeds)")

    def curve_figure(curve_of, name: str, caption: str, **labels) -> None:
        curves = _curves(finals, curve_of)
        if curves:
            figure, (axis,) = new_figure()
            _plot_curves(axis, curves)
            axis.set(**labels)
            axis.legend(fontsize="small")
            save(figure, name, caption)

    def noise(run):
        m = _suites(run).get("noise")
        return {s: 100 * e for s, e in zip(m["sigma"], m["error"])} if m else None

    def fgsm(run):
        m = _suites(run).get("fgsm")
        return {e: 100 * r for e, r in zip(m["sign"]["eps"], m["sign"]["attack_success_rate"])} if m else None

    curve_figure(noise, "noise.png", "Test error against the noise σ",
                 xlabel="noise σ", ylabel="test error %", title="Gaussian noise (mean ± sd over seeds)")
    curve_figure(fgsm, "fgsm.png", "FGSM attack success against ε",
                 xlabel="ε", ylabel="attack success %", title="FGSM x + ε·sign(∇L)")

    any_run = next((run for runs in finals.values() for run in runs if "pgd" in _suites(run)), None)
    if any_run is not None:
        attacks = _settings_of(study, budget, any_run, "pgd").get("attacks", [])
        figure, axes = new_figure(max(1, len(attacks)))
        for axis, attack in zip(axes, attacks):
            def pgd(run, name=attack["attack"]):
                curve = _suites(run).get("pgd", {}).get(name)
                return {k: 100 * r for k, r in zip(curve["steps"], curve["attack_success_rate"])} if curve else None

            _plot_curves(axis, _curves(finals, pgd))
            axis.set(xlabel="steps", ylabel="attack success %", title=f"{attack['attack']} ε={attack['eps']:.3g}")
            axis.legend(fontsize="small")
        save(figure, "pgd.png", "PGD attack success against the number of steps")

    any_run = next((run for runs in finals.values() for run in runs if "linbp" in _suites(run)), None)
    if any_run is not None:
        settings = _settings_of(study, budget, any_run, "linbp")
        figure, axes = new_figure(max(1, len(settings["eps"])))
        for i, (axis, eps) in enumerate(zip(axes, settings["eps"])):
            for gradient, marker, linestyle in (("bp", "o", "-"), ("linbp", "s", "--")):
                def linbp(run, gradient=gradient, i=i):
                    m = _suites(run).get("linbp", {}).get(gradient)
                    return ({k: 100 * r for k, r in zip(settings["steps"], m["attack_success_rate"][i])}
                            if m else None)

                _plot_curves(axis, _curves(finals, linbp), marker=marker, linestyle=linestyle,
                             suffix=" BP" if gradient == "bp" else " LinBP")
            axis.set(xlabel="steps", ylabel="attack success %", title=f"PGD ε={_eps_label(eps)}: BP and LinBP")
            axis.legend(fontsize="small")
        save(figure, "linbp.png", "PGD attack success with BP and LinBP gradients against the number of steps")

    def boundary(label):
        return [_suites(run)["boundary"] for run in finals.get(label, []) if "boundary" in _suites(run)]

    labels = [label for label in _ordered_labels(study, budget) if boundary(label)]
    if labels:
        figure, (axis,) = new_figure(width_per_panel=max(4.5, 1.6 * len(labels)))
        for x, label in enumerate(labels):
            seeds = boundary(label)
            medians = [m["median"] for m in seeds]
            axis.vlines([x] * len(seeds), [m["q1"] for m in seeds], [m["q3"] for m in seeds], alpha=0.4)
            axis.plot([x] * len(seeds), medians, "o")
        axis.set_xticks(range(len(labels)), labels, rotation=15)
        axis.set(ylabel="distance to the decision boundary", title="boundary distance: median and quartiles per seed")
        save(figure, "boundary.png", "Distance to the decision boundary (median, q1–q3 of each seed's points)")

    def estimate_error(run):
        e = (_suites(run).get("spectral") or {}).get("error")
        return {k: 100 * r for k, r in zip(e["n_iter"], e["estimate_rel_error_mean"])} if e else None

    curves = _curves(finals, estimate_error)
    if curves:
        figure, (axis, cost) = new_figure(2)
        _plot_curves(axis, curves)
        bounds = [100 * e["bound_rel_error_mean"] for runs in finals.values() for run in runs
                  if "bound_rel_error_mean" in (e := (_suites(run).get("spectral") or {}).get("error") or {})]
        if bounds:
            axis.axhline(statistics.fmean(bounds), color="black", linestyle="--", label="bound (mean)")
        axis.set(xlabel="power iterations", ylabel="relative error %", yscale="log",
                 title="spectral-norm estimate against the exact σ_max")
        axis.legend(fontsize="small")
        every_run = {"every final model": [run for runs in finals.values() for run in runs]}
        for key, name, marker in (("forward_s", "forward", "x"), ("estimate_s", "estimate (1 iteration)", "o"),
                                  ("bound_s", "bound", "^"), ("exact_s", "exact (full Jacobian)", "s")):
            def seconds(run, key=key):
                t = (_suites(run).get("spectral") or {}).get("timing")
                return dict(zip(t["batch_size"], t[key])) if t else None

            _plot_curves(cost, {name: curve for curve in _curves(every_run, seconds).values()}, marker=marker)
        cost.set(xlabel="batch size", ylabel="seconds per batch", xscale="log", yscale="log",
                 title="cost (mean ± sd over the final models)")
        if cost.has_data():
            cost.legend(fontsize="small")
        save(figure, "spectral.png", "Relative error of the power-iteration estimate against the number of "
                                     "iterations, and the seconds per batch of each computation")

    bars(metrics[-1], "seconds per epoch", "training cost", "seconds.png",
         "Seconds per training epoch per method (mean ± sd over seeds)")

    by_size = _error_by_size(study, budget, finals, test)
    if by_size:
        figure, (axis, gain) = new_figure(2)
        for series, (sizes, labels) in by_size.items():
            stats = [summary(test.values[label]) for label in labels]
            axis.errorbar(sizes, [m for m, _, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd, _ in stats],
                          marker="o", capsize=3, label=series)
            compared = [(size, label) for size, label in zip(sizes, labels) if study.baseline_of(label) != label
                        and test.values.get(study.baseline_of(label))]
            if compared:
                gain.plot([size for size, _ in compared],
                          [_relative_improvement(test, label, study.baseline_of(label)) for _, label in compared],
                          marker="o", label=series)
        axis.set(xlabel="training images", ylabel="test error %", xscale="log", title="test error against size")
        gain.set(xlabel="training images", ylabel="relative improvement %", xscale="log",
                 title="(baseline error − error) / baseline error")
        axis.legend(fontsize="small")
        gain.legend(fontsize="small")
        save(figure, "dataset_size.png", "Test error and relative improvement over the baseline against the number "
                                         "of training images (mean over seeds)")

    def loss(run):
        return {record["epoch"]: record["loss"] for record in run.get("history") or []
                if record.get("loss") is not None}

    curves = _curves(finals, loss)
    if curves:
        figure, (axis,) = new_figure()
        _plot_curves(axis, curves)
        axis.set(xlabel="epoch", ylabel="training loss", title="training loss (mean ± sd over seeds)")
        axis.legend(fontsize="small")
        save(figure, "loss.png", "Training loss per epoch (final runs)")
    return written


# ---------------------------------------------------------------- entry points


def report_markdown(study: Study, budget: str, runs: Sequence[dict], *, chosen: dict[str, dict] | None = None,
                    figures: Sequence[tuple[str, str]] = ()) -> str:
    """The report's markdown. chosen: model selection's choice per label (None: ask
    `robustbp.studies.runner.chosen_params`); figures: (file name, caption) to link."""
    if budget not in study.budgets:
        raise ValueError(f"study {study.name!r} has no budget {budget!r}; budgets: {', '.join(study.budgets)}")
    runs = _budget_runs(study, budget, runs)
    finals = _final_runs(study, budget, runs)
    metrics, sources = _metrics(study, budget, finals)
    lines = _header(study, budget, runs, finals)
    lines += _selection(study, budget, runs, finals, chosen)
    lines += _main_table(study, budget, metrics, sources)
    lines += _paper_table(study, metrics)
    lines += _claims(study, budget, metrics)
    if figures:
        lines += ["", "## Figures", ""]
        for name, caption in figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(study: Study, budget: str, runs: Sequence[dict], out_dir: str | Path, *,
                 chosen: dict[str, dict] | None = None) -> Path:
    """Write `out_dir/report.md` and its figures (PNG, only those there is data for), each file
    atomically; return the markdown's path."""
    if budget not in study.budgets:
        raise ValueError(f"study {study.name!r} has no budget {budget!r}; budgets: {', '.join(study.budgets)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget_runs = _budget_runs(study, budget, runs)
    finals = _final_runs(study, budget, budget_runs)
    metrics, _ = _metrics(study, budget, finals)
    figures = _figures(study, budget, finals, metrics, out_dir)
    path = out_dir / "report.md"
    write_text(path, report_markdown(study, budget, runs, chosen=chosen, figures=figures))
    return path
