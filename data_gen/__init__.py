"""MNIST-detection dataset generator writing COCO format (``python -m data_gen``).

Library use::

    from data_gen import GeneratorConfig, generate
    summary = generate(GeneratorConfig(out="data/mnist-det", train=100, val=10, test=10))

``data_gen`` never imports ``coorddet``: the COCO files on disk are their contract.
"""

from data_gen.config import GeneratorConfig
from data_gen.errors import UserError
from data_gen.generate import GENERATOR_VERSION, GenerationSummary, generate

__version__ = GENERATOR_VERSION
__all__ = ["GenerationSummary", "GeneratorConfig", "UserError", "__version__", "generate"]
