"""Boxes in float32 under mixed precision: anchors, box coding, matching and RoI boxes.

torchvision builds anchors in the feature maps' dtype and decodes boxes in the dtype of the
box regression outputs. Under ``torch.autocast`` with bfloat16 both are bf16, whose 8-bit
mantissa rounds a coordinate above 512 px to a multiple of 4 (above 1024 px, of 8): at COCO's
800x1333 the anchors, the proposals, the ground truth they are matched to and the RoIs would
all move by pixels. These parts are torchvision's, choosing only the dtype:

- :class:`FloatAnchorGenerator`: ``AnchorGenerator`` whose cell anchors and grid are float32
  whatever the maps' dtype;
- heads whose box regression outputs are float32 (:class:`FloatBoxRPNHead`,
  :class:`FloatBoxPredictor`, :class:`FloatBoxRetinaNetHead`, :class:`FloatBoxFCOSHead`,
  :class:`FloatBoxSSDLiteHead`): the convolutions still run in the autocast dtype, and only
  their small box outputs are cast, so decoding, proposals, matching, the regression targets
  and the RoI boxes all follow in float32 (autocast leaves these element-wise operations in
  their inputs' dtype).

Same submodules, so the same ``state_dict`` keys as torchvision's parts; in float32 each
computes exactly what torchvision's does (the casts are no-ops). This module must stay
TorchScript-compatible: no ``from __future__ import annotations``.
"""

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.ssdlite import SSDLiteHead


def box_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype boxes are computed in for features of ``dtype``: float32 for the half
    types (bfloat16, float16), else ``dtype`` itself (float32 stays, float64 stays)."""
    if dtype == torch.bfloat16 or dtype == torch.float16:
        return torch.float32
    return dtype


class FloatAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with anchors in :func:`box_dtype` of the maps'."""

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        dtype = box_dtype(dtype)
        self.cell_anchors = [anchor.to(dtype=dtype, device=device) for anchor in self.cell_anchors]


class FloatBoxRPNHead(RPNHead):
    """torchvision's ``RPNHead`` whose box deltas ``(N, 4A, H, W)`` are float32."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits: list[Tensor] = []
        bbox_reg: list[Tensor] = []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            bbox_reg.append(self.bbox_pred(t).to(box_dtype(t.dtype)))
        return logits, bbox_reg


class FloatBoxPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` whose box deltas ``(R, 4 * classes)`` are float32."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        scores = self.cls_score(x)
        bbox_deltas = self.bbox_pred(x)
        return scores, bbox_deltas.to(box_dtype(bbox_deltas.dtype))


def _float_boxes(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    regression = outputs["bbox_regression"]
    outputs["bbox_regression"] = regression.to(box_dtype(regression.dtype))
    return outputs


class FloatBoxRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` whose ``bbox_regression`` is float32."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return _float_boxes(
            {"cls_logits": self.classification_head(x), "bbox_regression": self.regression_head(x)}
        )


class FloatBoxFCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` whose ``bbox_regression`` (distances to the box sides) is
    float32."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_logits = self.classification_head(x)
        bbox_regression, bbox_ctrness = self.regression_head(x)
        return _float_boxes(
            {
                "cls_logits": cls_logits,
                "bbox_regression": bbox_regression,
                "bbox_ctrness": bbox_ctrness,
            }
        )


class FloatBoxSSDLiteHead(SSDLiteHead):
    """torchvision's ``SSDLiteHead`` whose ``bbox_regression`` is float32."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return _float_boxes(
            {"bbox_regression": self.regression_head(x), "cls_logits": self.classification_head(x)}
        )
