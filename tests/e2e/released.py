"""`slipstream train ARGS` as `python -m slipstream` runs it, then one line on stdout: whether
the run's trainer (its DDP wrapper and the comm hook's Python state) is still alive once the
command returned. It must not be: freed at interpreter exit instead, a gloo worker thread
still releasing a Python object can abort the process."""

from __future__ import annotations

import sys
import weakref

import slipstream.train
from slipstream.cli import main

trainers: list[weakref.ref] = []


class Trainer(slipstream.train.Trainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        trainers.append(weakref.ref(self))


slipstream.train.Trainer = Trainer  # the CLI imports it when it runs

if __name__ == "__main__":
    status = main(["train", *sys.argv[1:]])
    alive = sum(r() is not None for r in trainers)
    print(f"trainers alive after train: {alive} of {len(trainers)}")
    sys.exit(status)
