"""``python -m coorddet.evaluate``: the evaluation command's entry point.

The command line is :mod:`coorddet.cli.evaluate`; the library it calls is
:func:`coorddet.evaluation.evaluate` (predict -> score -> write), re-exported here.
"""

from coorddet.cli.evaluate import main
from coorddet.evaluation import evaluate

__all__ = ["evaluate", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
