"""Train a Faster R-CNN, baseline or CoordConv: ``python train.py [--coordconv] [--help]``.

The command lives in :mod:`coorddet.cli.train` so that the installed ``coorddet-train``
script runs exactly the same code.
"""

from coorddet.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
