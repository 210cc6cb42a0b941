"""Train a classifier with any method of the registry, with checkpoints that resume exactly.

    robustbp train --dataset fashion-mnist --model lenet --method jacobian-spectral --beta 0.01 \
        --lr 0.01 --momentum 0.8 --batch-size 32 --schedule constant --epochs 50 --out runs/spec

or from Python:

    from robustbp.train import TrainConfig, train, load_run
    result = train(TrainConfig(method="loss-ibp", method_params={"beta": 0.03, "p": 1}), "runs/ibp")
    model, config = load_run("runs/ibp")

The code lives in `robustbp/training/` (config.py: settings and schedules; loop.py: the loop;
runs.py: run folders, atomic files, load_run).
"""
from robustbp.training import *  # noqa: F401,F403
from robustbp.training import __all__  # noqa: F401
