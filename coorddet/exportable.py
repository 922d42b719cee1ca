"""A Faster R-CNN as a graph of fixed shapes, for ``torch.export`` and ONNX.

torchvision's detectors do not export (pytorch/pytorch's and pytorch/vision's trackers hold
the reports): their post-processing filters boxes in Python, so every tensor after the RPN
has a size known only at run time, and code branches on those sizes. :class:`ExportableDetector`
computes the same detections with every filter a mask: boxes that torchvision drops stay in
place, zeroed and flagged invalid; non-maximum suppression (``torchvision.ops.nms``, whose
output is the graph's one run-time size) only fills a mask of fixed length; the best boxes
are picked with ``topk``. Its output is a fixed number of slots per image and a count.

- input ``images``: float32 ``(N, C, H, W)`` in ``[0, 1]``, exactly the batch size and image
  size it was built for (both are fixed in the exported graph); ``C`` 1 or 3, converted to
  the model's channels as the model does;
- outputs ``boxes`` float32 ``(N, D, 4)`` xyxy in input pixels, ``scores`` float32 ``(N, D)``,
  ``labels`` int64 ``(N, D)`` (the dataset's category ids), ``counts`` int64 ``(N,)``: image
  ``i``'s detections are its first ``counts[i]`` slots, best score first; the other slots
  are zero. ``D`` is the model's ``box_detections_per_img``.

CoordConv layers: an image-aligned layer's coordinates depend on where the image lies in the
padded batch, which is fixed once the input size is. Each layer's coordinate term is computed
once for that size, in eager mode by the layer itself, and becomes a constant of the graph
(:class:`FixedCoordinateTerm`); the model's extent hooks are not part of it.

Supported: the ``faster-rcnn`` detector with torchvision's RPN and RoIAlign pooling (every
backbone). :func:`check_exportable` says why another model is not.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign

from coorddet.coordconv import CoordConv2d
from coorddet.errors import UserError
from coorddet.poolers import MatmulRoIAlign, _stride_scale


def check_exportable(model: nn.Module, what: str) -> None:
    """:class:`UserError` naming ``what`` unless :class:`ExportableDetector` can take ``model``."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(model, GeneralizedRCNN) or not isinstance(model.rpn, RegionProposalNetwork):
        reason = "only Faster R-CNN (detector faster-rcnn) exports"
    elif not hasattr(heads, "box_predictor"):
        reason = "an RPN-only model has no detections to export"
    elif getattr(heads, "mask_roi_pool", None) is not None:
        reason = "Mask R-CNN's masks do not export; only Faster R-CNN (detector faster-rcnn)"
    elif not isinstance(heads.box_roi_pool, MatmulRoIAlign | MultiScaleRoIAlign):
        reason = "only RoIAlign pooling exports (model.roi_pool align), not RoIPool"
    else:
        return
    raise UserError(f"{what}: cannot export this model: {reason}")


class FixedCoordinateTerm(nn.Module):
    """A :class:`CoordConv2d` for one input size: its convolution plus its coordinate term,
    computed beforehand by the layer itself, one per map size it ran on (a layer of an RPN
    or a one-stage head runs on every pyramid level): constants of shape (1 or N, C_out, H, W)."""

    def __init__(self, layer: CoordConv2d, terms: dict[tuple[int, int], Tensor]) -> None:
        super().__init__()
        self.layer = layer
        for (height, width), term in terms.items():
            self.register_buffer(f"term_{height}x{width}", term.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        term = getattr(self, f"term_{x.shape[-2]}x{x.shape[-1]}")
        return self.layer._conv_forward(x, self.layer.weight, self.layer.bias) + term


def _freeze_coordinates(model: nn.Module, images: list[Tensor]) -> nn.Module:
    """A copy of ``model`` whose CoordConv layers are :class:`FixedCoordinateTerm` s for
    ``images``' size (one eager forward records each layer's terms)."""
    model = copy.deepcopy(model).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CoordConv2d)}
    terms: dict[str, dict[tuple[int, int], Tensor]] = {name: {} for name in layers}

    def record(name: str, module: CoordConv2d, x: Tensor) -> None:
        terms[name][(int(x.shape[-2]), int(x.shape[-1]))] = module.coordinate_term(x)

    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, name=name: record(name, module, args[0])
        )
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FixedCoordinateTerm(layer, terms[name]))
    return model


def kept_by_nms(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou: float) -> Tensor:
    """(M,) bool: the ``valid`` boxes that torchvision's ``batched_nms`` keeps when given only
    the valid ones. ``boxes`` (M, 4) xyxy, ``scores`` (M,), ``groups`` (M,) int (suppression
    within a group only). Invalid boxes become empty boxes, which overlap nothing and so
    suppress nothing; the offsets are torchvision's (its ``_batched_nms_coordinate_trick``)."""
    boxes = torch.where(valid[:, None], boxes, torch.zeros_like(boxes))
    offsets = groups.to(boxes.dtype) * (boxes.max() + 1)
    keep = box_ops.nms(boxes + offsets[:, None], scores, iou)
    return torch.zeros_like(valid).index_fill(0, keep, True) & valid


def _best(scores: Tensor, chosen: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``count`` best-scored ``chosen`` entries (fewer when there are fewer
    entries), best first, and which of them are chosen (the rest fill the slots)."""
    count = min(count, scores.shape[0])
    values, index = torch.where(chosen, scores, torch.full_like(scores, -torch.inf)).topk(count)
    return index, values > -torch.inf


class ExportableDetector(nn.Module):
    """``model``'s detections for a batch of ``batch_size`` images of ``image_size`` (height,
    width), in fixed shapes (see the module's docstring). ``category_ids``: label ``k`` ->
    ``category_ids[k - 1]`` (``None``: labels are the ids)."""

    def __init__(
        self,
        model: GeneralizedRCNN,
        *,
        image_size: tuple[int, int],
        batch_size: int,
        channels: int,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_exportable(model, type(model).__name__)
        self.image_size, self.batch_size, self.channels = tuple(image_size), batch_size, channels
        example = [torch.zeros(channels, *self.image_size)] * batch_size
        self.model = _freeze_coordinates(model, example)
        heads = self.model.roi_heads
        classes = heads.box_predictor.cls_score.out_features
        ids = list(range(classes)) if category_ids is None else [0, *category_ids]
        self.register_buffer("category_ids", torch.tensor(ids, dtype=torch.int64))
        self.detections = heads.detections_per_img

    def example(self) -> Tensor:
        """An input of the shape the detector takes (zeros)."""
        return torch.zeros(self.batch_size, self.channels, *self.image_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        transform = self.model.transform
        resized = [transform.resize(transform.normalize(image), None)[0] for image in images]
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized]
        image_list = ImageList(transform.batch_images(resized, transform.size_divisible), sizes)
        features = self.model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, real = self._proposals(image_list, features)
        boxes, scores, labels, chosen = self._detections(features, proposals, real, sizes)
        boxes = torch.stack(
            [resize_boxes(b, size, self.image_size) for b, size in zip(boxes, sizes, strict=True)]
        )
        zero = torch.zeros_like(scores)
        boxes = torch.where(chosen[..., None], boxes, torch.zeros_like(boxes))
        labels = torch.where(chosen, self.category_ids[labels], torch.zeros_like(labels))
        return boxes, torch.where(chosen, scores, zero), labels, chosen.sum(dim=1)

    def _proposals(
        self, image_list: ImageList, features: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's ``RegionProposalNetwork`` in eval mode: (N, P, 4) proposals, best
        first, and (N, P) which are real."""
        rpn = self.model.rpn
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(image_list, maps)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        count = len(anchors)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(count, -1, 4)
        objectness = objectness.detach().reshape(count, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)]
        )
        top = rpn._get_top_n_idx(objectness, per_level)
        rows = torch.arange(count)[:, None]
        scores, levels = torch.sigmoid(objectness[rows, top]), levels[top]
        boxes, real = [], []
        for image in range(count):
            clipped = box_ops.clip_boxes_to_image(
                proposals[image][top[image]], image_list.image_sizes[image]
            )
            widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
            valid = (widths >= rpn.min_size) & (heights >= rpn.min_size)
            valid = valid & (scores[image] >= rpn.score_thresh)
            kept = kept_by_nms(clipped, scores[image], levels[image], valid, rpn.nms_thresh)
            index, chosen = _best(scores[image], kept, rpn.post_nms_top_n())
            boxes.append(
                torch.where(chosen[:, None], clipped[index], torch.zeros_like(clipped[index]))
            )
            real.append(chosen)
        return torch.stack(boxes), torch.stack(real)

    def _pool(self, features: dict[str, Tensor], proposals: Tensor, sizes: list) -> Tensor:
        """RoIAlign of every proposal slot: (N * P, C, S, S), as the model's pooler."""
        pooler = self.model.roi_heads.box_roi_pool
        count, slots = proposals.shape[:2]
        index = torch.arange(count, dtype=proposals.dtype).repeat_interleave(slots)
        rois = torch.cat([index[:, None], proposals.reshape(-1, 4)], dim=1)
        maps = [value for name, value in features.items() if name in pooler.featmap_names]
        size = pooler.output_size
        if isinstance(pooler, MatmulRoIAlign):
            scale = _stride_scale(maps[0], sizes)
            return roi_align(maps[0], rois, size, scale, pooler.sampling_ratio, aligned=False)
        if len(maps) == 1:
            scale = pooler.scales[0]
            return roi_align(maps[0], rois, size, scale, pooler.sampling_ratio, aligned=False)
        levels = pooler.map_levels([proposals.reshape(-1, 4)])[:, None, None, None]
        pooled = None
        for level, (feature, scale) in enumerate(zip(maps, pooler.scales, strict=True)):
            result = roi_align(feature, rois, size, scale, pooler.sampling_ratio, aligned=False)
            pooled = result if pooled is None else torch.where(levels == level, result, pooled)
        return pooled

    def _detections(
        self, features: dict[str, Tensor], proposals: Tensor, real: Tensor, sizes: list
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """torchvision's ``RoIHeads`` in eval mode: per image the ``D`` best detections
        (boxes in the resized image's pixels, scores, model labels) and which are real."""
        heads = self.model.roi_heads
        count, slots = proposals.shape[:2]
        pooled = self._pool(features, proposals, sizes)
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        classes = logits.shape[-1]
        decoded = heads.box_coder.decode(regression, [proposals.reshape(-1, 4)])
        decoded = decoded.reshape(count, slots, classes, 4)
        probabilities = F.softmax(logits, -1).reshape(count, slots, classes)
        labels = torch.arange(1, classes).expand(slots, classes - 1).reshape(-1)
        outputs: list[list[Tensor]] = [[], [], [], []]
        for image in range(count):
            boxes = box_ops.clip_boxes_to_image(decoded[image], sizes[image])[:, 1:].reshape(-1, 4)
            scores = probabilities[image][:, 1:].reshape(-1)
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = real[image][:, None].expand(slots, classes - 1).reshape(-1)
            valid = valid & (scores > heads.score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)
            kept = kept_by_nms(boxes, scores, labels, valid, heads.nms_thresh)
            index, chosen = _best(scores, kept, heads.detections_per_img)
            for output, value in zip(
                outputs, (boxes[index], scores[index], labels[index], chosen), strict=True
            ):
                output.append(value)
        boxes, scores, labels, chosen = (torch.stack(output) for output in outputs)
        return boxes, scores, labels, chosen
