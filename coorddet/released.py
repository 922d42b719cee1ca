"""The region proposal network of the CoordConv paper's released code, from torchvision parts.

``uber-research/CoordConv`` (commit 27fab8b) trains an RPN with no RoI head for its MNIST
detection result (``train_faster_rcnn.py``, ``model_builder_faster_rcnn.RegionProposalSampler``,
``utils_faster_rcnn.make_anchors_mnist``). :func:`coorddet.models.build_model` assembles it
with ``detector="rpn-only", rpn="released"`` from the pieces here, which plug into torchvision's
``GeneralizedRCNN`` and ``RegionProposalNetwork`` interfaces:

- :class:`ReleasedRPNHead`: ``another_conv`` (3x3, 32, ReLU) shared by ``box_mover`` (3x3, 32,
  ReLU, then a zero-initialised 1x1 to 4k) and ``box_scorer`` (1x1 to 2k, a 2-way softmax).
  Named like torchvision's ``RPNHead`` (``conv``, ``bbox_pred``, ``cls_logits``), so the
  CoordConv sites ``rpn-head`` and ``rpn-box`` are the released ones: before ``another_conv``
  and before ``box_mover``'s final 1x1 (the objectness conv gets none).
- :class:`ReceptiveFieldAnchors`: the 9 (h, w) templates of :data:`TEMPLATES` centred where
  each map cell's receptive field is centred (``make_anchors_mnist``), in one of two layouts,
  :data:`ANCHOR_LAYOUTS`. ``"intended"``: anchor ``a`` of every cell is template ``a`` at that
  cell. ``"released"``: what the released code trains with. It builds a ``[4, k, h, w]``
  array (coordinate, template, row, column), reshapes it to ``(4k, h, w)`` and transposes it
  to ``(h, w, 4k)``; ``reshape_box_features`` then reads the last axis as ``[k, 4]``. So
  component ``c`` of anchor ``n`` is coordinate ``(4n + c) // k`` of template
  ``(4n + c) % k``: with k = 9, anchors 0-1 are ``(i, i, i, i)`` (centred at (row i, column
  i), as tall and wide as their row position), 2 is ``(i, j, j, j)``, 3 is ``(j, j, j, j)``,
  4 is ``(j, j, 15, 20)``, and 5-8 sit at fixed image positions whatever the cell:
  ``(25, 15, 20, 20)``, ``(25, 15, 25, 15)``, ``(20, 25, 20, 25)``, ``(15, 20, 25, 15)``
  as ``(i_centre, j_centre, h, w)``. Only anchor 2 is centred on its own cell.
- :class:`ReleasedRegionProposalNetwork`: torchvision's RPN with the released training and
  inference rules (:func:`released_sample`, :func:`released_losses`, no clipping).
- :class:`NoRoIHeads`: the RoI-head slot of an RPN-only ``GeneralizedRCNN``.

Box parametrisation: the released ``(ti, tj, th, tw)`` is torchvision's ``BoxCoder`` with
weights (1, 1, 1, 1) in another order (``(tj, ti, tw, th)``), which only permutes the
zero-initialised regression channels. Differences that remain, all minor: torchvision's
decoder clamps ``th, tw`` at log(1000/16) (a box 62 times its anchor); the released
CoordConv channels span [0, 1] where coorddet's span [-1, 1] (an affine change the conv
bias absorbs); he-normal weights are drawn from torch's truncated normal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import box_iou, nms

from coorddet.fp32_boxes import box_dtype

TEMPLATES = (
    (15, 15),
    (20, 20),
    (25, 25),
    (15, 20),
    (20, 25),
    (20, 15),
    (25, 20),
    (15, 25),
    (25, 15),
)
"""The released ``RPNParams.anchors``: (height, width) in pixels, in that order."""
ANCHOR_LAYOUTS = ("released", "intended")
SAMPLE_SIZE = 12  # BoxSamplerParams: boxes per image, half positive at most
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.1  # BoxSamplerParams hi_thresh / lo_thresh
NMS_IOU, MAX_PROPOSALS = 0.8, 10  # NMSParams
_TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def he_normal_(conv: nn.Conv2d) -> nn.Conv2d:
    """TensorFlow's ``he_normal``: truncated normal, variance 2 / fan_in; zero bias."""
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_STD
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def receptive_field_centres(padding: str) -> tuple[float, float]:
    """(first centre, stride) in pixels of ``mnist-small``'s map cells (conv5, pool2, conv5,
    pool2), as ``make_anchors_mnist`` (``"valid"``: 8, 4) and ``make_anchors_mnist_same``
    (``"same"``: 2, 4) compute them: half the receptive field plus the padding offset."""
    size, stride, offset = 1.0, 1.0, 0.0
    for kernel, step, is_conv in ((5, 1, True), (2, 2, False), (5, 1, True), (2, 2, False)):
        if is_conv and padding == "same":
            offset -= (kernel - 1) / 2 * stride
        size, stride = size + stride * (kernel - 1), stride * step
    return size / 2 + offset, stride


def template_anchors(
    height: int,
    width: int,
    *,
    first: float,
    stride: float,
    templates: Sequence[tuple[float, float]] = TEMPLATES,
    layout: str = "intended",
) -> Tensor:
    """Anchors of an ``height x width`` map: float32 ``(height * width * k, 4)`` xyxy pixels,
    ordered (row, column, anchor) as torchvision's RPN flattens its head outputs.

    Cell (r, c) is centred at ``(first + stride * r, first + stride * c)`` (row, column); see
    the module docstring for the two layouts.
    """
    if layout not in ANCHOR_LAYOUTS:
        raise ValueError(
            f"anchor_layout={layout!r} is not valid; valid: {', '.join(ANCHOR_LAYOUTS)}"
        )
    k = len(templates)
    sizes = torch.tensor(templates, dtype=torch.float64)  # (k, 2): h, w
    grid = torch.empty(4, k, height, width, dtype=torch.float64)  # released: ic, jc, h, w
    grid[0] = (first + stride * torch.arange(height, dtype=torch.float64))[None, :, None]
    grid[1] = (first + stride * torch.arange(width, dtype=torch.float64))[None, None, :]
    grid[2] = sizes[:, 0, None, None]
    grid[3] = sizes[:, 1, None, None]
    if layout == "intended":
        cells = grid.permute(2, 3, 1, 0)  # (h, w, k, 4)
    else:  # reshape to (4k, h, w), transpose to (h, w, 4k), read back as (h, w, k, 4)
        cells = grid.reshape(4 * k, height, width).permute(1, 2, 0).reshape(height, width, k, 4)
    i, j, h, w = cells.reshape(-1, 4).unbind(1)
    return torch.stack([j - w / 2, i - h / 2, j + w / 2, i + h / 2], dim=1).float()


class ReceptiveFieldAnchors(nn.Module):
    """Anchor generator for one feature map: :func:`template_anchors` for every image."""

    def __init__(
        self,
        first: float,
        stride: float,
        templates: Sequence[tuple[float, float]] = TEMPLATES,
        layout: str = "intended",
    ) -> None:
        super().__init__()
        template_anchors(1, 1, first=first, stride=stride, templates=templates, layout=layout)
        self.first, self.stride, self.layout = first, stride, layout
        self.templates = tuple(tuple(t) for t in templates)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [len(self.templates)]

    def forward(self, images: ImageList, features: list[Tensor]) -> list[Tensor]:
        (feature,) = features
        key = (*feature.shape[-2:], feature.device, feature.dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = template_anchors(
                *key[:2], first=self.first, stride=self.stride, templates=self.templates,
                layout=self.layout,
            ).to(feature.device, box_dtype(feature.dtype))  # fmt: skip
            self._cache[key] = anchors
        return [anchors] * len(images.image_sizes)

    def extra_repr(self) -> str:
        return f"first={self.first}, stride={self.stride}, layout={self.layout!r}"


class ReleasedRPNHead(nn.Module):
    """The released RPN head: ``(N, C, H, W)`` maps -> objectness ``(N, k, H, W)`` (the
    positive minus the negative logit of the 2-way softmax, so torchvision's sigmoid gives
    the same probability) and box deltas ``(N, 4k, H, W)``. he-normal weights, zero bias;
    the box regressor starts at zero (every anchor unmoved)."""

    def __init__(self, in_channels: int, num_anchors: int = len(TEMPLATES), hidden: int = 32):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU())
        self.box_hidden = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU())
        self.bbox_pred = nn.Conv2d(hidden, 4 * num_anchors, 1)
        self.cls_logits = nn.Conv2d(hidden, 2 * num_anchors, 1)
        for conv in (self.conv[0], self.box_hidden[0], self.cls_logits):
            he_normal_(conv)
        nn.init.zeros_(self.bbox_pred.weight)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            shared = self.conv(feature)
            scores = self.cls_logits(shared)  # (N, 2k): per anchor (positive, negative)
            objectness.append(scores[:, 0::2] - scores[:, 1::2])
            deltas.append(self.bbox_pred(self.box_hidden(shared)))
        return objectness, deltas


def released_sample(
    moved: Tensor, gt: Tensor, height: int, width: int, sample_size: int = SAMPLE_SIZE
) -> tuple[Tensor, Tensor, Tensor]:
    """The released ``BoxSampler`` for one image.

    ``moved``: ``(M, 4)`` xyxy, the anchors after the predicted transform; ``gt``: ``(G, 4)``.
    IoUs are those of the *moved* boxes. Positive (box, gt) pairs: each gt's best box,
    whatever its IoU, and every pair with IoU > 0.5 whose box lies inside the image
    (``x1, y1 >= 0``, ``x2 <= width - 1``, ``y2 <= height - 1``). Negatives: boxes inside the
    image with IoU < 0.1 against every gt and no gt's best box; if there are none, every box
    in no positive pair. Up to ``sample_size // 2`` positive pairs and ``sample_size // 2``
    negatives are drawn at random (torch's generator); as in the released code, no negative
    at all is drawn when there are not more candidates than that.

    Returns ``(positive boxes (P,), their gts (P,), negative boxes (Q,))``, int64 indices.
    """
    n_pos = sample_size // 2
    n_neg = sample_size - n_pos
    inside = (moved[:, 0] >= 0) & (moved[:, 1] >= 0)
    inside &= (moved[:, 2] <= width - 1) & (moved[:, 3] <= height - 1)
    iou = box_iou(moved, gt)  # (M, G)
    closest = torch.zeros_like(iou, dtype=torch.bool)
    if len(gt):
        closest[iou.argmax(dim=0), torch.arange(len(gt), device=gt.device)] = True
    positive = closest | ((iou > POSITIVE_IOU) & inside[:, None])
    pairs = positive.nonzero()  # row-major, as tf.where
    pairs = pairs[torch.randperm(len(pairs), device=pairs.device)[:n_pos]]
    negative = ((iou < NEGATIVE_IOU) & inside[:, None] & ~closest).all(dim=1)
    candidates = negative.nonzero()[:, 0]
    if not len(candidates):
        candidates = (~positive.any(dim=1)).nonzero()[:, 0]
    if len(candidates) > n_neg:
        negatives = candidates[torch.randperm(len(candidates), device=candidates.device)[:n_neg]]
    else:
        negatives = candidates[:0]
    return pairs[:, 0], pairs[:, 1], negatives


def released_smooth_l1(x: Tensor) -> Tensor:
    """The released ``smooth_l1``: ``x**2`` where ``|x| <= 1``, else ``|x|``, summed over the
    last axis (not torch's ``0.5 x**2`` / ``|x| - 0.5``)."""
    absolute = x.abs()
    return torch.where(absolute > 1, absolute, x * x).sum(dim=-1)


class ReleasedRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` with the released rules.

    Training: per image, :func:`released_sample` on the moved boxes; the box loss is the mean
    over positive pairs of :func:`released_smooth_l1` of (predicted - target) deltas, targets
    encoded from the *anchor* to its gt; the objectness loss the mean binary cross-entropy
    (= the 2-way softmax's) over the sampled boxes; both averaged over the images.
    Training returns no proposals (only RPN-only detectors use this RPN).
    Inference: the ``pre_nms_top_n`` best-scored moved boxes (default: all), NMS at
    ``nms_thresh``, the ``post_nms_top_n`` best; boxes are not clipped to the image (the
    released ``--clip`` is off) and none is dropped for its size.
    """

    def __init__(
        self,
        anchor_generator: nn.Module,
        head: nn.Module,
        *,
        pre_nms_top_n: int = 100_000,
        post_nms_top_n: int = MAX_PROPOSALS,
        nms_thresh: float = NMS_IOU,
        sample_size: int = SAMPLE_SIZE,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=POSITIVE_IOU,
            bg_iou_thresh=NEGATIVE_IOU,
            batch_size_per_image=sample_size,
            positive_fraction=0.5,
            pre_nms_top_n={"training": pre_nms_top_n, "testing": pre_nms_top_n},
            post_nms_top_n={"training": post_nms_top_n, "testing": post_nms_top_n},
            nms_thresh=nms_thresh,
        )
        self.sample_size = sample_size

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        count = len(anchors)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # float32 boxes under autocast (coorddet.fp32_boxes): bf16 rounds pixels
        moved = self.box_coder.decode(deltas.detach().to(box_dtype(deltas.dtype)), anchors)
        moved = moved.view(count, -1, 4)
        scores = objectness.detach().view(count, -1)
        if self.training:  # RPN-only models use no proposals in training: skip the NMS
            boxes = [image_boxes[:0] for image_boxes in moved]
        else:
            boxes = [self._proposals(b, s) for b, s in zip(moved, scores, strict=True)]
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training")
            losses = self._losses(
                anchors, moved, objectness.view(count, -1), deltas.view(count, -1, 4), targets,
                images.image_sizes,
            )  # fmt: skip
        return boxes, losses

    def _proposals(self, boxes: Tensor, scores: Tensor) -> Tensor:
        top = min(self.pre_nms_top_n(), len(scores))
        if top < len(scores):
            scores, order = scores.topk(top)
            boxes = boxes[order]
        keep = nms(boxes, torch.sigmoid(scores), self.nms_thresh)[: self.post_nms_top_n()]
        return boxes[keep]

    def _losses(self, anchors, moved, objectness, deltas, targets, sizes) -> dict[str, Tensor]:  # noqa: ANN001
        box_losses, score_losses = [], []
        for image_anchors, image_moved, image_scores, image_deltas, target, (height, width) in zip(
            anchors, moved, objectness, deltas, targets, sizes, strict=True
        ):
            gt = target["boxes"].to(image_moved.dtype)
            positive, matched, negative = released_sample(
                image_moved, gt, height, width, self.sample_size
            )
            if len(positive):
                wanted = self.box_coder.encode_single(gt[matched], image_anchors[positive])
                box_losses.append(released_smooth_l1(image_deltas[positive] - wanted).mean())
            else:
                box_losses.append(image_deltas.sum() * 0.0)
            logits = torch.cat([image_scores[positive], image_scores[negative]])
            labels = torch.cat(
                [torch.ones_like(image_scores[positive]), torch.zeros_like(image_scores[negative])]
            )
            if len(logits):
                score_losses.append(F.binary_cross_entropy_with_logits(logits, labels))
            else:
                score_losses.append(image_scores.sum() * 0.0)
        return {
            "loss_objectness": torch.stack(score_losses).mean(),
            "loss_rpn_box_reg": torch.stack(box_losses).mean(),
        }


class NoRoIHeads(nn.Module):
    """The RoI-head slot of an RPN-only ``GeneralizedRCNN``: no detections, no losses.

    The model's losses are the RPN's alone; its proposals are scored by ``rpn_iou``
    (:func:`coorddet.inference.paper_proposals`), and detection metrics are undefined.
    """

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        detections = [
            {
                "boxes": boxes[:0],
                "scores": boxes.new_zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64, device=boxes.device),
            }
            for boxes in proposals
        ]
        return detections, {}
