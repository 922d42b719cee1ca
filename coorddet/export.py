"""``python -m coorddet.export``: the export command's entry point (:mod:`coorddet.cli.export`)."""

from coorddet.cli.export import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
