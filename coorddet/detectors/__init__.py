"""Detector builders, one short keyword-only function each; :mod:`coorddet.models` names them.

A builder takes the option groups it needs by parameter name (:data:`OPTION_GROUPS`:
``image``, ``anchors``, ``proposals``, ``box_head``, ``released``; and ``num_classes``) and
returns a model without CoordConv; :func:`coorddet.models.build_model` checks the options,
calls it, injects CoordConv and sets the memory format.
"""

from coorddet.detectors.faster_rcnn import faster_rcnn, mask_rcnn, rpn_only
from coorddet.detectors.one_stage import fcos, retinanet, ssdlite
from coorddet.detectors.options import OPTION_GROUPS
from coorddet.detectors.parts import GrayscaleTransform
from coorddet.detectors.released import released_rpn_only

__all__ = [
    "OPTION_GROUPS",
    "GrayscaleTransform",
    "faster_rcnn",
    "fcos",
    "mask_rcnn",
    "released_rpn_only",
    "retinanet",
    "rpn_only",
    "ssdlite",
]
