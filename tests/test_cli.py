"""The `robustbp` command: registries listed, one-line errors, a tiny train + evaluate end to end."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from robustbp import cli, data, methods, models
from robustbp.training import read_history

from .helpers import one_thread_per_module  # noqa: F401 (autouse fixture)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:  # argparse's --help and usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


TINY = ("--dataset", "digits", "--model", "mlp-2x256", "--epochs", "1", "--train-size", "200",
        "--batch-size", "50", "--lr", "0.05", "--quiet")


# -------------------------------------------------------------------------- registries
@pytest.mark.parametrize("command, names", [("methods", methods.available), ("datasets", data.available),
                                            ("models", models.available)])
def test_registry_listings_name_everything(capsys, command, names):
    code, out, err = run(capsys, command)
    assert code == 0 and err == ""
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed == names()


def test_methods_listing_shows_parameters(capsys):
    _, out, _ = run(capsys, "methods", "--short")
    assert "loss-ibp" in out and "beta=0.01" in out and "p=1" in out


def test_every_option_has_a_help_text():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(cli.COMMANDS)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"robustbp {name} {action.option_strings} has no help"


# ----------------------------------------------------------------------------- errors
ERRORS = [
    (("train", "--dataset", "no-such-set", "--quiet"), "unknown dataset 'no-such-set'"),
    (("train", "--model", "no-such-net", "--quiet"), "unknown model 'no-such-net'"),
    (("train", "--method", "no-such-method", "--quiet"), "unknown method 'no-such-method'"),
    (("train", "--dataset", "fashion-mnist", "--data-dir", "/no/such/folder", "--quiet"), "does not exist"),
    (("train", "--epochs", "-3", "--quiet"), "epochs must be a whole number >= 1"),
    (("train", "--lr", "0", "--quiet"), "lr must be > 0"),
    (("train", "--lr", "-0.1", "--quiet"), "lr must be > 0"),
    (("train", "--batch-size", "0", "--quiet"), "batch_size"),
    (("train", "--epochs", "two"), "invalid int value"),
    (("train", "--schedule", "linear", "--quiet"), "invalid schedule"),
    (("train", "--method", "standard", "--beta", "0.1", "--quiet"), "method 'standard' does not take --beta"),
    (("train", "--method", "loss-ibp", "--eps", "0.1", "--quiet"), "does not take --eps; it takes --beta, --p"),
    (("train", "--method", "loss-ibp", "--param", "gamma=2", "--quiet"), "does not take --gamma"),
    (("train", "--no-such-option"), "unrecognized arguments"),
    (("train", "--resume", "--out", "/no/such/run"), "holds no config.json"),
    (("train", "--config", "/no/such/file.toml"), "config file /no/such/file.toml does not exist"),
    (("train", "--device", "gpu", "--quiet"), "invalid device 'gpu'"),
    (("evaluate", "--checkpoint", "/no/such/run"), "run folder /no/such/run does not exist"),
    (("evaluate", "--checkpoint", "/no/such/run", "--suite", "accuracy"),
     "the accuracy suite is now the clean suite (clean.json, accuracy as a fraction); use --suite clean"),
    (("evaluate", "--checkpoint", "/no/such/run", "--suite", "noise,pgd2"), "unknown suite pgd2; available: clean, noise"),
    (("nonsense",), "invalid choice"),
    (("demo", "--epochs", "0", "--quiet"), "epochs must be a whole number >= 1"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_are_one_line_without_traceback(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written in the working tree
    monkeypatch.delenv("ROBUSTBP_DATA", raising=False)
    code, out, err = run(capsys, *argv)
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("robustbp: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # a failed command leaves no run folder behind


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "robustbp", "train", "--epochs", "-1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "robustbp: error: epochs must be a whole number >= 1, got -1"
    ]


# -------------------------------------------------------------------------- end to end
def test_train_then_evaluate(capsys, tmp_path):
    a, b = tmp_path / "std", tmp_path / "ibp"
    code, out, err = run(capsys, "train", *TINY, "--out", str(a))
    assert code == 0, err
    assert "test error" in out
    code, _, err = run(capsys, "train", *TINY, "--method", "loss-ibp", "--beta", "0.05", "--p", "2",
                       "--seed", "1", "--out", str(b))
    assert code == 0, err
    config = json.loads((b / "config.json").read_text())
    assert config["method"] == "loss-ibp" and config["method_params"] == {"beta": 0.05, "p": 2}
    assert config["seed"] == 1 and config["train_size"] == 200 and config["lr"] == 0.05

    code, _, err = run(capsys, "train", *TINY, "--out", str(a))
    assert code != 0 and "already holds a run" in err

    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(a), "--compare", str(b), "--limit", "100",
                         "--out", str(out_dir))  # the default suite: clean
    assert code == 0, err
    from robustbp.training import load_run

    clean = json.loads((out_dir / "clean.json").read_text())
    _, test = data.load("digits")
    for name, run_dir in (("std", a), ("ibp", b)):
        model, _ = load_run(run_dir)
        with torch.no_grad():
            count = int((model(test.images[:100]).argmax(1) == test.labels[:100]).sum())
        numbers = clean["models"][name]
        assert numbers["accuracy"] == count / 100 and numbers["n_correct"] == count and numbers["n"] == 100
        assert f"{100 * count / 100:.1f}" in out  # printed in percent
    assert sorted(p.name for p in out_dir.iterdir()) == ["clean.json", "clean.png", "evaluate-config.json"]
    setup = json.loads((out_dir / "evaluate-config.json").read_text())
    assert setup["suites"] == ["clean"] and setup["dataset"] == "digits" and setup["images"] == 100
    assert "std" in out and "ibp" in out


def test_evaluate_help_lists_every_registered_suite(capsys):
    from robustbp.evaluate import REGISTRY

    code, out, _ = run(capsys, "evaluate", "--help")
    assert code == 0
    listed = " ".join(out.split())  # argparse wraps long lines
    for suite in REGISTRY.values():
        assert f"- {suite.name}: {suite.description}" in listed
    assert "default clean" in listed and "accuracy:" not in listed


def test_evaluate_with_the_evaluation_suites(capsys, tmp_path):
    run_dir = tmp_path / "std"
    assert run(capsys, "train", *TINY, "--out", str(run_dir))[0] == 0
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(run_dir), "--suite", "noise,clean",
                       "--limit", "50", "--quick", "--set", "noise_sigmas=0,0.25", "--out", str(tmp_path / "eval"))
    assert code == 0, err
    noise = json.loads((tmp_path / "eval" / "noise.json").read_text())
    assert noise["settings"]["sigma"] == [0.0, 0.25] and noise["n_points"] == 50
    clean = json.loads((tmp_path / "eval" / "clean.json").read_text())["models"]["std"]
    assert noise["models"]["std"]["accuracy"][0] == clean["accuracy"] == clean["n_correct"] / 50
    for argv, message in [
        (("--suite", "no-such-suite"), "unknown suite"),
        (("--suite", "noise", "--set", "noise_sigmas=0,-0.1"), "finite and non-negative, got -0.1"),
        (("--suite", "noise", "--set", "no_such_budget=1"), "expected NAME=VALUE"),
        (("--suite", "pgd", "--set", "pgd_restarts=1.5"), "not a whole number"),
    ]:
        code, _, err = run(capsys, "evaluate", "--checkpoint", str(run_dir), *argv, "--out", str(tmp_path / "bad"))
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()  # nothing written


def test_resume_from_the_command_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *TINY, "--out", str(run_dir))[0] == 0
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--epochs", "2", "--quiet")
    assert code == 0, err
    assert [e["epoch"] for e in read_history(run_dir)["epochs"]] == [1, 2]
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--lr", "0.5", "--quiet")
    assert code != 0 and "cannot resume" in err


def test_resume_with_fewer_epochs_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *TINY, "--epochs", "3", "--out", str(run_dir))[0] == 0
    model_file = (run_dir / "model.pt").read_bytes()
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--epochs", "2", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "with epochs 2: it has already trained 3 epochs; resume with epochs >= 3" in err
    assert (run_dir / "model.pt").read_bytes() == model_file
    code, out, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--epochs", "4", "--quiet")
    assert code == 0, err
    assert "after 4 epochs" in out and [e["epoch"] for e in read_history(run_dir)["epochs"]] == [1, 2, 3, 4]


def test_config_file_then_options(capsys, tmp_path):
    (tmp_path / "run.toml").write_text(
        'dataset = "digits"\nmodel = "mlp-2x256"\nmethod = "loss-ibp"\nepochs = 1\ntrain_size = 100\n'
        "[method_params]\nbeta = 0.02\n"
    )
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "run.toml"), "--beta", "0.04", "--quiet",
                       "--out", str(tmp_path / "run"))
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method_params"] == {"beta": 0.04} and config["train_size"] == 100


def test_non_finite_loss_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TINY, "--lr", "1e12", "--momentum", "0", "--epochs", "3",
                       "--out", str(tmp_path / "run"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "non-finite loss" in err and "epoch" in err and "step" in err


def test_ctrl_c_saves_then_resume_finishes(capsys, tmp_path, monkeypatch):
    import signal

    from robustbp.training import loop

    real_make_method = loop.make_method
    calls = {"n": 0}

    def ctrl_c_on_third_step(logits, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    monkeypatch.setattr(loop, "make_method", lambda config, loss_fn=None: real_make_method(config, ctrl_c_on_third_step))
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", *TINY, "--out", str(run_dir))
    assert code == 130
    assert "Traceback" not in err and f"robustbp train --resume --out {run_dir}" in err
    assert read_history(run_dir)["status"] == "interrupted"
    monkeypatch.setattr(loop, "make_method", real_make_method)
    code, out, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--quiet")
    assert code == 0, err
    assert read_history(run_dir)["status"] == "complete" and (run_dir / "model.pt").is_file()


def test_readme_shows_the_rule_table():
    """The README's table of operations and of what each method holds constant is what
    `robustbp layers` prints from the rule table, so it cannot drift from the code."""
    from pathlib import Path

    from robustbp.operations import layers_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert layers_markdown() in readme


def test_method_options_come_from_the_declarations(capsys):
    """Every parameter a method declares with a command-line parser is a `train` option with the
    declaration's help; a function parameter (tangents) is not."""
    import robustbp.methods as methods
    from robustbp.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, (parse, help_text, _) in methods.parameter_help().items():
        option = "--" + name.replace("_", "-")
        if parse is None:
            assert option + " " not in text
        else:
            assert option in text and " ".join(help_text.split()) in text, name


def test_clip_option_parses_two_numbers(tmp_path):
    from robustbp.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--method", "adversarial", "--clip", "0,1", "--out", str(tmp_path / "r")])
    assert train_config_from_args(args).method_params == {"clip": [0.0, 1.0]}
