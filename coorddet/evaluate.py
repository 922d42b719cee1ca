"""``python -m coorddet.evaluate``: the evaluation command (:mod:`coorddet.cli.evaluate`).

The command's library function is :func:`coorddet.evaluation.evaluate`, re-exported here.
"""

from coorddet.cli.evaluate import main
from coorddet.evaluation import evaluate

__all__ = ["evaluate", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
