"""The CoordConv paper's released detector: its RPN alone on ``mnist-small`` (``rpn: released``).

Assembled from :mod:`coorddet.released`'s pieces: the released RPN head, 9 anchor templates
at receptive-field centres (in the ``anchor_layout`` asked for), its sampler, losses and NMS,
and no RoI head. ``backbone_padding: valid`` (a 13x13 map for 64 px canvases) and
``backbone_init: he-normal`` give the released code's backbone.
"""

from __future__ import annotations

from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from coorddet.detectors import parts
from coorddet.detectors.options import ImageOptions, ReleasedOptions
from coorddet.released import (
    TEMPLATES,
    NoRoIHeads,
    ReceptiveFieldAnchors,
    ReleasedRegionProposalNetwork,
    ReleasedRPNHead,
    receptive_field_centres,
)


def released_rpn_only(*, image: ImageOptions, released: ReleasedOptions) -> GeneralizedRCNN:
    """The released code's RPN-only detector; needs ``backbone="mnist-small"``."""
    if image.backbone != "mnist-small":
        raise ValueError(
            "rpn='released' is the released code's RPN-only detector: it needs "
            "detector='rpn-only' and backbone='mnist-small'"
        )
    body = parts.backbone(image)
    first, stride = receptive_field_centres(image.backbone_padding)
    rpn = ReleasedRegionProposalNetwork(
        ReceptiveFieldAnchors(first, stride, TEMPLATES, released.anchor_layout),
        ReleasedRPNHead(body.out_channels, len(TEMPLATES)),
    )
    return GeneralizedRCNN(body, rpn, NoRoIHeads(), parts.transform(image))
