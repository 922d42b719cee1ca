"""``python -m coorddet.predict``: the prediction command's entry point
(:mod:`coorddet.cli.predict`; the library is :func:`coorddet.evaluation.new_images.predict_images`)."""

from coorddet.cli.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
