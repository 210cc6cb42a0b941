"""The `robustbp` command: parse, call the library, print. One subcommand per entry in COMMANDS.

    robustbp train --dataset fashion-mnist --model lenet --method jacobian-spectral --beta 0.01 --epochs 10 --out runs/spec
    robustbp train --resume --out runs/spec               # continue an interrupted run
    robustbp train --nproc 2 --dataset digits --out runs/two   # data-parallel, 2 processes (torchrun)
    robustbp evaluate --checkpoint runs/spec --compare runs/std --suite noise,fgsm,pgd --out runs/eval
    robustbp methods | datasets | models                  # what the registries hold
    robustbp demo --out runs/demo                         # the three-method demo (under a minute on 2 idle cores)

Errors (unknown names, missing data, invalid numbers) print one line, `robustbp: error: ...`,
and exit with status 1 (2 for a malformed command line); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbp.training.device import DEVICE_HELP
from robustbp.validation import MissingDependency

PROG = "robustbp"


class UsageError(ValueError):
    """A command-line mistake found after parsing (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------------- train
TRAIN_HELP = {
    "dataset": "dataset name (see `robustbp datasets`); default %s",
    "data_dir": "folder holding the dataset's files (default: $ROBUSTBP_DATA, then /usr/share/datasets)",
    "model": "model name (see `robustbp models`); default %s",
    "dropout": "dropout probability on the last internal fully connected layer; default %s",
    "activation": "hidden nonlinearity: relu, tanh or logistic; default %s",
    "method": "training method (see `robustbp methods`); default %s",
    "epochs": "number of epochs; default %s",
    "batch_size": "images per step; with several processes the global batch, cut into equal slices (it must "
                  "divide by their number); default %s",
    "lr": "initial learning rate of SGD; default %s",
    "momentum": "SGD momentum in [0, 1); default %s",
    "weight_decay": "L2 weight decay coefficient of SGD; default %s",
    "schedule": "learning-rate schedule, stepped every epoch: constant, exp:GAMMA, step:N[:GAMMA] (halving by default), cosine; default %s",
    "augment": "random shifts and scalings of the training images as in the IBP paper (flips for CIFAR); default %s",
    "train_size": "train on a stratified subset of this many training images; default: all",
    "val_size": "hold out this many training images (or this fraction, < 1) for validation; default %s (none)",
    "seed": "seed of the initialization, shuffling, augmentation and the method's randomness; default %s",
    "device": "torch device: " + DEVICE_HELP + "; with several processes on CUDA each uses cuda:LOCAL_RANK; "
              "default %s",
    "amp": "mixed precision: none, or bf16 (each training step under torch.autocast with bfloat16, no gradient "
           "scaler; refused by the methods whose gradient it would make unsound); fp16 is refused; default %s",
    "log_every": "refresh the progress bar every this many steps; default %s",
}
NUMBER_TYPES = {"epochs": int, "batch_size": int, "train_size": int, "seed": int, "log_every": int}

# Method parameters as command-line options: name -> (parser, help). None: not settable here.
def _auto(text: str) -> Any:
    """A --param value: true/false, an int, a float, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from robustbp.training import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train data-parallel in N processes on this machine, started through torchrun "
                             "(torch.distributed.run; gloo on the CPU, NCCL on GPUs): --batch-size is the global "
                             "batch and must divide by N; an epoch's last partial batch is split evenly when it "
                             "divides by N, else dropped; BatchNorm in train mode normalizes with each process's "
                             "own slice. Under torchrun or another launcher leave it out")
    parser.add_argument("--config", metavar="FILE",
                        help="a JSON or TOML file of settings that differ from the defaults (options below override it)")
    parser.add_argument("--out", metavar="DIR",
                        help="run folder for config.json, history.json, checkpoint.pt and model.pt; "
                             "default runs/DATASET-MODEL-METHOD")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out from its checkpoint (settings are read from it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    group = parser.add_argument_group("training settings (defaults: the IBP paper's MNIST setup)")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "method_params":
            continue
        option = "--" + field.name.replace("_", "-")
        text = TRAIN_HELP[field.name]
        text = text % (getattr(defaults, field.name),) if "%s" in text else text
        if field.type in (bool, "bool"):
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "val_size":
            group.add_argument(option, type=_count_or_fraction, default=None, metavar="N", help=text)
        else:
            kind = NUMBER_TYPES.get(field.name) or (float if isinstance(field.default, float) else str)
            group.add_argument(option, type=kind, default=None, metavar=field.name.upper(), help=text)
    from robustbp import methods

    methods_group = parser.add_argument_group("method parameters (only those the chosen method takes)")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for param, (convert, text, takers) in sorted(methods.parameter_help().items()):
        if param in train_names or convert is None:  # a function (tangents) is set from Python
            continue
        used_by = ", ".join(f"{m} (default {d})" for m, d in takers)
        methods_group.add_argument("--" + param.replace("_", "-"), dest=f"param_{param}", type=convert,
                                   default=None, metavar=param.upper(), help=f"{text}; taken by {used_by}")
    methods_group.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                               help="any method parameter by name (repeatable), e.g. --param beta=0.01")


def _count_or_fraction(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig: defaults, then --config FILE, then the options given on the command line."""
    from robustbp.training import TrainConfig, read_config
    from robustbp.training.config import read_config_file

    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out, the run folder to continue")
        values = read_config(args.out).to_dict()
    if args.config:
        values.update(read_config_file(args.config))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "method_params" and getattr(args, f.name, None) is not None}
    values.update(given)
    params = dict(values.get("method_params") or {})
    explicit = {key[len("param_"):]: value for key, value in vars(args).items()
                if key.startswith("param_") and value is not None}
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param expects NAME=VALUE, got {item!r}")
        explicit[name.strip().replace("-", "_")] = _auto(text.strip())
    params.update(explicit)
    values["method_params"] = params
    config = TrainConfig.from_dict(values)
    check_names(config, explicit)
    return config


def check_names(config, explicit: dict[str, Any]) -> None:
    """Unknown dataset, model or method, or a parameter the method does not take: one clear error."""
    from robustbp import data, methods, models

    data.info(config.dataset)
    models.info(config.model)
    accepted = methods.parameters_of(config.method)
    for name in config.method_params:
        if name not in accepted:
            option = f"--{name.replace('_', '-')}" if name in explicit else f"parameter {name!r}"
            takes = ", ".join(f"--{a.replace('_', '-')}" for a in accepted) or "no parameters"
            raise UsageError(f"method {config.method!r} does not take {option}; it takes {takes}")


def run_train(args: argparse.Namespace) -> int:
    from robustbp.training import train

    config = train_config_from_args(args)
    out = Path(args.out or f"runs/{config.dataset}-{config.model}-{config.method}")
    if args.nproc is not None:
        return launch_train(args, config, out)
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if result.status != "complete":
        return 130
    if result.rank != 0:
        return 0
    final = result.final
    if final:
        val = f", validation error {final['val_error']:.2f}%" if final.get("val_error") is not None else ""
        print(f"{out}: test error {final['test_error']:.2f}%{val} after {final['epoch']} epochs")
    else:
        print(f"{out}: already complete")
    return 0


def launch_train(args: argparse.Namespace, config, out: Path) -> int:
    """`robustbp train --nproc N`: check what can be checked here, then run the same command
    without --nproc in N processes through torchrun; rank 0 prints the result."""
    from robustbp.training import distributed, runs
    from robustbp.training.loop import check_amp, make_method

    distributed.check_launch(args.nproc, config.batch_size, config.device)
    runs.check_run_folder(out, config, args.resume, args.overwrite, args.nproc)
    check_amp(make_method(config), config.amp)
    distributed.launch(args.nproc, without_nproc(args.argv))
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The command line `argv` without its --nproc option (however abbreviated)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc")
    _, rest = parser.parse_known_args(argv)
    return rest


# ------------------------------------------------------------------------------ evaluate
class KeepLinesFormatter(argparse.HelpFormatter):
    """argparse's help formatter, but a help text's own line breaks stay (each line is wrapped alone)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines = []
        for part in text.splitlines():
            lines += super()._split_lines(part, width)
        return lines


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from robustbp import evaluate

    parser.formatter_class = KeepLinesFormatter
    suites = "\n".join(f"- {suite.name}: {suite.description}" for suite in evaluate.REGISTRY.values())
    parser.add_argument("--checkpoint", required=True, metavar="RUN",
                        help="a run folder (or its model.pt / checkpoint.pt) to evaluate")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                        help="more run folders, evaluated on the same images beside the first")
    parser.add_argument("--suite", default="clean", metavar="S1,S2",
                        help=f"comma-separated evaluation suites (they run in the order listed here); "
                             f"default clean:\n{suites}")
    parser.add_argument("--out", metavar="DIR", help="folder for the tables (JSON) and plots (PNG); default RUN/evaluation")
    parser.add_argument("--data-dir", metavar="DIR", help="folder holding the dataset (default: the one the run was trained with)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate on the first N test images only")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise and random starts; default 0")
    parser.add_argument("--quick", action="store_true", help="fewer points and iterations (a smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="change one budget of the suites, e.g. --set noise_sigmas=0,0.1,0.3 --set pgd_restarts=5 "
                             "(names: the fields of robustbp.evaluate.SuiteSettings); repeatable")
    parser.add_argument("--device", default="cpu", help=f"torch device: {DEVICE_HELP}; default cpu")


def evaluation_suites(text: str) -> list[str]:
    """The suite names of `--suite a,b`, each one registered."""
    from robustbp import evaluate

    suites = [s.strip() for s in text.split(",") if s.strip()]
    if not suites:
        raise UsageError("--suite names no suite")
    if "accuracy" in suites:
        raise UsageError("the accuracy suite is now the clean suite (clean.json, accuracy as a fraction); "
                         "use --suite clean")
    unknown = [s for s in suites if s not in evaluate.SUITES]
    if unknown:
        raise UsageError(f"unknown suite {', '.join(unknown)}; available: {', '.join(evaluate.SUITES)}")
    return suites


def run_evaluate(args: argparse.Namespace) -> int:
    from robustbp import data, evaluate
    from robustbp.evaluate.report import write_json
    from robustbp.training import check_device, load_run

    suites = evaluation_suites(args.suite)  # every name and budget checked before anything is loaded or written
    try:
        settings = evaluate.override_settings(evaluate.QUICK if args.quick else evaluate.FULL, args.settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a whole number >= 1, got {args.limit}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    device = check_device(args.device)
    paths = [args.checkpoint, *args.compare]
    loaded = [(Path(p), *load_run(p, device=device)) for p in paths]
    datasets = {config.dataset for _, _, config in loaded}
    if len(datasets) > 1:
        raise UsageError(f"the runs were trained on different datasets ({', '.join(sorted(datasets))}); compare runs of one dataset")
    config = loaded[0][2]
    _, test = data.load(config.dataset, args.data_dir or config.data_dir)
    images, labels = test.images[: args.limit], test.labels[: args.limit]
    images, labels = images.to(device), labels.to(device)
    models = {}
    for path, model, _ in loaded:
        name = path.name if path.is_dir() else path.parent.name
        models[name if name not in models else str(path)] = model
    for suite in suites:
        evaluate.REGISTRY[suite].check_images(images)  # e.g. square and apgd need the attack library
    first = Path(args.checkpoint)
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    setup = {"runs": {name: str(p) for name, p in zip(models, paths)}, "dataset": config.dataset,
             "images": len(labels), "suites": suites, "seed": args.seed, "quick": args.quick, "set": args.settings,
             "command": " ".join([PROG, *sys.argv[1:]]) if sys.argv else PROG}
    write_json(out / "evaluate-config.json", setup)
    evaluate.evaluate_runs(models, images, labels, suites, out, seed=args.seed, quick=args.quick, settings=settings)
    print(f"results in {out}")
    return 0


# ------------------------------------------------------------------------- the registries
def run_methods(args: argparse.Namespace) -> int:
    from robustbp import methods

    for name in methods.available():
        cls = methods.base.method_class(name)
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        params = ", ".join(f"{k}={v!r}" for k, v in methods.parameters_of(name).items()) or "no parameters"
        print(f"{name:<22} {params}")
        if args.short:
            continue
        if doc:
            print(f"{'':<22} {doc}")
        for key, (default, declaration) in methods.base.declared_parameters(cls).items():
            print(f"{'':<22}   {key}: {declaration.help}")
    return 0


def run_datasets(args: argparse.Namespace) -> int:
    from robustbp import data

    for name in data.available():
        info = data.info(name)
        where = "embedded" if info.embedded else "on disk"
        print(f"{name:<15} {info.sizes[0]:>6}/{info.sizes[1]:<6} {'×'.join(map(str, info.shape)):<8} {where:<8} "
              f"{'' if args.short else info.description}".rstrip())
    return 0


def run_models(args: argparse.Namespace) -> int:
    from robustbp import models

    for name in models.available():
        info = models.info(name)
        print(f"{name:<18} {'' if args.short else info.description}".rstrip())
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from robustbp.operations import layers_markdown

    print(layers_markdown())
    return 0


def add_short(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="names and sizes only, no descriptions")


# ---------------------------------------------------------------------------------- study
def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    from robustbp.studies.definition import BUDGETS
    from robustbp.studies.runner import DEFAULT_RUNS, DEFAULT_STORE

    actions = parser.add_subparsers(dest="study_action", metavar="ACTION", parser_class=Parser, required=True,
                                    help="list, run, status or report")
    actions.add_parser("list", help="the studies and what each reproduces")
    for action, text in (("run", "run what the store lacks of a study (resumes a killed one)"),
                         ("status", "which runs of a study the store holds, which failed, what is missing"),
                         ("report", "the study's report: tables beside the paper's figures, tests, PNGs")):
        child = actions.add_parser(action, help=text, description=text)
        child.add_argument("name", help="study name (see `robustbp study list`)")
        child.add_argument("--budget", choices=BUDGETS, default="smoke", help="smoke (seconds), cpu (1 to 4 h on "
                           "2 cores; the run prints the time the study has left) or paper (the paper's "
                           "settings); default smoke")
        child.add_argument("--store", default=str(DEFAULT_STORE), metavar="PATH",
                           help=f"the SQLite result store; default {DEFAULT_STORE}")
        if action == "run":
            child.add_argument("--workers", type=int, default=1, metavar="N",
                               help="runs at once, each with cores/N torch threads; default 1")
            child.add_argument("--backend", choices=("local", "ray"), default="local",
                               help="local processes, or one Ray task per run (pip install robustbp[ray]); default local")
            child.add_argument("--ray-address", default=None, metavar="ADDRESS",
                               help="an existing Ray cluster (default: start a local instance)")
            child.add_argument("--runs-dir", default=str(DEFAULT_RUNS), metavar="DIR",
                               help="where runs keep checkpoints, so a killed run resumes (on a Ray cluster: a "
                                    "folder every node sees); default runs/studies")
        if action == "report":
            child.add_argument("--out", default=None, metavar="DIR",
                               help="folder for report.md and its figures; default docs/results/NAME-BUDGET")


def run_study(args: argparse.Namespace) -> int:
    from robustbp.studies import definition, runner

    if args.study_action == "list":
        for name in definition.available():
            study = definition.load(name)
            print(f"{name:<22} {study.title} ({study.source})")
        return 0
    study = definition.load(args.name)
    if args.study_action == "run":
        counts = runner.run_study(study, args.budget, args.store, workers=args.workers, backend=args.backend,
                                  ray_address=args.ray_address, runs_dir=args.runs_dir)
        print(f"{study.name} [{args.budget}]: {counts['recorded']} runs recorded now ({counts['failed']} failed), "
              f"{counts['skipped']} already in {args.store}")
        return 1 if counts["failed"] else 0
    if args.study_action == "status":
        state = runner.status(study, args.budget, args.store)
        print(f"{study.name} [{args.budget}]: {len(state['recorded'])} of {len(state['planned'])} planned runs "
              f"recorded, {len(state['failed'])} failed, {len(state['missing'])} missing")
        for key in state["failed"]:
            print(f"  failed: {key}")
        for key in state["missing"]:
            print(f"  missing: {key}")
        return 0
    from robustbp.studies import report
    from robustbp.studies.store import ResultStore

    runs = [run for run in ResultStore(args.store).runs(study.name) if run["config"]["budget"] == args.budget]
    if not runs:
        raise ValueError(f"{args.store} holds no run of {study.name} at budget {args.budget}; "
                         f"run `robustbp study run {study.name} --budget {args.budget}` first")
    out = Path(args.out) if args.out else Path("docs/results") / f"{study.name}-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"report: {report.write_report(study, args.budget, runs, out)}")
    return 0


# ----------------------------------------------------------------------------------- demo
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from robustbp import demo

    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for the runs, table and plot; default runs/demo")
    parser.add_argument("--epochs", type=int, default=demo.EPOCHS, help=f"epochs per method; default {demo.EPOCHS}")
    parser.add_argument("--train-size", type=int, default=None, metavar="N",
                        help="train on N of mnist-5k's 4,000 training images; default all")
    parser.add_argument("--test-size", type=int, default=None, metavar="N",
                        help="evaluate on N of its 1,000 test images; default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run; default 0")
    parser.add_argument("--device", default="cpu", help=f"torch device: {DEVICE_HELP}; default cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    from robustbp import demo

    started = time.perf_counter()
    result = demo.run(args.out, epochs=args.epochs, train_size=args.train_size, test_size=args.test_size,
                      seed=args.seed, progress=not args.quiet, device=args.device)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; table {result['table_path']}, plot {result['plot_path']}")
    return 0


# ---------------------------------------------------------------------------------- bench
BENCH_SETUPS = (("ibp-mnist", 128), ("lenet", 32))  # the defaults: the IBP MNIST net and LeNet


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from robustbp import bench

    parser.add_argument("--model", default=None,
                        help="model to time (default: ibp-mnist at batch 128, then lenet at batch 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (with --model); default 128")
    parser.add_argument("--image-size", type=int, default=28, help="input height and width; default 28")
    parser.add_argument("--channels", type=int, default=1, help="input channels; default 1")
    parser.add_argument("--methods", default=",".join(bench.DEFAULT_METHODS),
                        help="comma-separated methods, each NAME or NAME:key=value/key=value; default: all, "
                             "with loss-ibp at p=1 and p=2 and adversarial in both variants")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, each running every method once; default 20")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first; default 3")
    parser.add_argument("--device", default="cpu", help=f"torch device: {DEVICE_HELP}; default cpu")
    parser.add_argument("--spectral", action="store_true",
                        help="also time the power-iteration spectral-norm estimate against the exact one")
    parser.add_argument("--trainer", action="store_true",
                        help="also time an epoch of the trainer against a plain PyTorch loop")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE as JSON")


def run_bench(args: argparse.Namespace) -> int:
    from robustbp import bench
    from robustbp.training import check_device

    device = str(check_device(args.device))
    specs = tuple(spec.strip() for spec in args.methods.split(",") if spec.strip())
    setups = ((args.model, args.batch_size or 128),) if args.model else BENCH_SETUPS
    if args.batch_size is not None and not args.model:
        setups = tuple((model, args.batch_size) for model, _ in setups)
    report: dict[str, Any] = {"setups": []}
    for model, batch in setups:
        timings = bench.bench(model, batch, specs, rounds=args.rounds,
                              warmup=args.warmup, image_size=args.image_size, in_channels=args.channels,
                              device=device)
        print(f"{model}, batch {batch}, {args.image_size}×{args.image_size}, {args.rounds} interleaved rounds "
              f"(median step: zero_grad + method.backward + SGD step)")
        print(bench.format_table(timings) + "\n")
        report["setups"].append({"model": model, "batch_size": batch, "rounds": args.rounds,
                                 "timings": bench.as_json(timings)})
    if args.spectral:
        rows = bench.spectral_cost()
        print("spectral norm per batch: power iteration (1 iteration) against the exact value, batched "
              "(vmap of jacrev + matrix 2-norm) and one sample at a time")
        for row in rows:
            shape = "×".join(map(str, row["input"]))
            print(f"  {row['model']} {shape} C={row['classes']} batch {row['batch']}: estimate {row['estimate_ms']:.1f} ms; "
                  f"exact batched {row['exact_ms']:.1f} ms ({row['speedup']:.0f}× slower), "
                  f"per sample {row['exact_loop_ms']:.0f} ms ({row['speedup_over_loop']:.0f}× slower)")
        report["spectral"] = rows
    if args.trainer:
        overhead = bench.trainer_overhead()
        print(f"trainer epoch (standard, ibp-mnist, mnist-5k) {overhead['trainer_s']:.3f} s against a plain loop "
              f"{overhead['plain_loop_s']:.3f} s: ratio {overhead['ratio']:.3f}")
        report["trainer"] = overhead
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


# ------------------------------------------------------------------------------- the command
COMMANDS: dict[str, Command] = {
    "train": Command("train a model with one method", add_train_arguments, run_train),
    "evaluate": Command("evaluate trained runs (clean accuracy, noise, attacks, boundary distance, spectral norm)",
                        add_evaluate_arguments, run_evaluate),
    "methods": Command("list the training methods and their parameters", add_short, run_methods),
    "datasets": Command("list the datasets", add_short, run_datasets),
    "models": Command("list the models", add_short, run_models),
    "layers": Command("the operations the linearized pass follows, and what each method holds constant",
                      lambda parser: None, run_layers),
    "demo": Command("train three methods on mnist-5k and compare their robustness (under a minute on 2 idle CPU cores)",
                    add_demo_arguments, run_demo),
    "study": Command("the papers' studies: list, run (kill-safe, resumable), status, report",
                     add_study_arguments, run_study),
    "bench": Command("time one training step of each method side by side, and its ratio to standard",
                     add_bench_arguments, run_bench),
}


def build_parser(only: str | None = None) -> Parser:
    """The whole command line; with `only` (a command's name), that command's options alone are
    built (the others keep their names and help), so that e.g. `robustbp train` does not import
    what the study commands need."""
    import robustbp

    parser = Parser(prog=PROG, description="Backpropagation extensions that train classifiers robust to small input changes.")
    parser.add_argument("--version", action="version", version=f"{PROG} {robustbp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        if only is None or name == only:
            command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command `argv` names (its first word when that is a command), else None."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError):  # str(KeyError) quotes its argument
        text = text.strip("'\"")
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    try:
        from robustbp.runtime import keep_freed_memory

        keep_freed_memory()
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(command_of(argv))
        args = parser.parse_args(argv)
        args.argv = argv
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args) or 0)
    except BrokenPipeError:  # e.g. `robustbp methods | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except UsageError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, MissingDependency) as error:  # includes DataError, FileNotFoundError
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from robustbp.studies.store import StoreLocked
        from robustbp.training import NonFiniteLoss
        from robustbp.training.distributed import RunFailed

        if not isinstance(error, (NonFiniteLoss, RunFailed, StoreLocked)):
            raise
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
