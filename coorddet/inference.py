"""Inference with torchvision's detection internals: the one module that reaches into them.

Two jobs, both tied to torchvision's private inference code (hence one module, and its
bit-exact tripwire tests beside it in ``tests/test_inference.py``, which fail the day a
torchvision release changes what is copied or reused here):

- :func:`predict_with_proposals`: detections exactly as ``model(images)`` gives them, plus
  :func:`paper_proposals`, the CoordConv paper's RPN proposals (NMS 0.8, the 10 best), from
  one backbone pass, for the detectors that :func:`has_proposals`. It replays
  ``GeneralizedRCNN.forward`` step by step and runs a shallow copy of the RPN with other
  ``_pre_nms_top_n``/``_post_nms_top_n``; proposals are rescaled with ``resize_boxes`` from
  torchvision's (unexported) ``transform`` module. The evaluation's predict stage
  (:mod:`coorddet.evaluation.prediction`) calls it.
- :class:`BatchedRegionProposalNetwork` and :class:`BatchedRoIHeads`: torchvision's proposal
  filtering, detection post-processing and (in training) matching of anchors and proposals to
  the ground truth with the per-image steps batched (torchvision clips, thresholds, drops
  small boxes and matches image by image: many small tensor operations per image). Only what
  cannot be batched stays per image (picking an image's surviving boxes, non-maximum
  suppression, the samplers' random draws), with the same torchvision calls on the same boxes
  in the same order: the outputs are torchvision's, bit for bit (docs/speed.md has the gain).
  :mod:`coorddet.detectors` builds its detectors with them;
  :func:`use_batched_postprocessing` gives any torchvision Faster R-CNN the same.

This module must stay TorchScript-compatible: no ``from __future__ import annotations``.
"""

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from coorddet.device import ints_to_device
from coorddet.fp32_boxes import box_dtype
from coorddet.predictions import ImagePrediction

# --- detections and the paper's proposals ----------------------------------------------------


def has_proposals(model: torch.nn.Module) -> bool:
    """Whether ``model`` has torchvision's region proposal network (a ``GeneralizedRCNN``):
    :func:`predict_with_proposals` and :func:`paper_proposals` apply to it."""
    return isinstance(model, GeneralizedRCNN) and isinstance(
        getattr(model, "rpn", None), RegionProposalNetwork
    )


def paper_proposals(
    model: GeneralizedRCNN,
    images: ImageList,
    features: Mapping[str, Tensor] | Tensor,
    *,
    top_k: int = 10,
    nms_iou: float = 0.8,
    rpn_outputs: Mapping[str, Any] | None = None,
) -> list[Tensor]:
    """The RPN proposals of the CoordConv paper: NMS at ``nms_iou``, then the ``top_k`` best.

    Runs a shallow copy of ``model.rpn`` (a torchvision ``RegionProposalNetwork``, shared weights)
    in eval mode with those settings; the model itself is not changed. NMS is per feature level,
    as in torchvision. ``images`` is the ``ImageList`` from ``model.transform``; ``features``
    what ``model.backbone`` returned for it. ``rpn_outputs`` (``{"head": ..., "anchors": ...}``,
    what ``model.rpn.head`` and ``model.rpn.anchor_generator`` returned for these ``features``)
    skips recomputing them. Returns per image a float ``(P, 4)`` xyxy tensor, ``P <= top_k``,
    best objectness first, in the *transformed* image's pixels.

    With one feature level, NMS first runs on the ``4 * top_k`` best-scored proposals only (of
    the RPN's ``pre_nms_top_n``, 300 for ``mnist-small``), then on all of them for a batch in
    which an image kept fewer than ``top_k``. Same result: greedy NMS decides each box from
    the better-scored ones alone, so the first ``top_k`` kept of a prefix are the first
    ``top_k`` kept of the whole list (faster; docs/speed.md).
    """
    if top_k < 1 or not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"need top_k >= 1 and 0 < nms_iou <= 1, got {top_k=}, {nms_iou=}")
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    rpn = copy.copy(model.rpn)  # own __dict__, shared submodules and weights
    rpn.training = False  # the copy's flag only; .eval() would reach the shared submodules
    rpn.nms_thresh = nms_iou
    rpn._post_nms_top_n = {"training": top_k, "testing": top_k}
    if rpn_outputs is not None:
        rpn._modules = OrderedDict(rpn._modules)  # the copy's submodule table, not the model's
        rpn.head = _Replay(rpn_outputs["head"])
        rpn.anchor_generator = _Replay(rpn_outputs["anchors"])
    candidates = rpn._pre_nms_top_n["testing"]
    shortlist = 4 * top_k if len(features) == 1 else candidates
    with torch.no_grad():
        if shortlist < candidates:
            rpn._pre_nms_top_n = {"training": shortlist, "testing": shortlist}
            proposals, _ = rpn(images, features)
            if all(len(image_proposals) == top_k for image_proposals in proposals):
                return proposals
            rpn._pre_nms_top_n = {"training": candidates, "testing": candidates}
        proposals, _ = rpn(images, features)
    return proposals


class _Replay(torch.nn.Module):
    """A submodule that returns what the real one returned for the same input (no recompute)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any) -> Any:
        return self.output


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode and without gradients for the block; each module's training
    mode is restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes.items():
            module.training = training


def predict_with_proposals(
    model: GeneralizedRCNN,
    images: list[Tensor],
    *,
    image_ids: Sequence[int],
    top_k: int = 10,
    nms_iou: float = 0.8,
) -> list[ImagePrediction]:
    """Detections (exactly ``model(images)`` in eval mode) and paper proposals, per image.

    ``model`` is a torchvision ``FasterRCNN``; ``images`` float ``(C, H, W)`` tensors as
    ``model`` takes them; ``image_ids`` their COCO ids. Runs the model's own steps (transform,
    backbone, rpn, roi_heads, postprocess) as module calls, so hooks fire; proposals are
    rescaled to original image pixels like the detections. Training modes are restored.
    """
    if len(image_ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image_ids")
    with evaluating(model):
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        outputs: dict[str, Any] = {}
        hooks = [
            getattr(model.rpn, name).register_forward_hook(
                lambda module, args, output, name=name: outputs.__setitem__(name, output)
            )
            for name in ("head", "anchor_generator")
        ]
        try:
            proposals, _ = model.rpn(image_list, features)
        finally:
            for hook in hooks:
                hook.remove()
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        sizes = image_list.image_sizes
        detections = model.transform.postprocess(detections, sizes, original_sizes)
        paper = paper_proposals(
            model, image_list, features, top_k=top_k, nms_iou=nms_iou,
            rpn_outputs={"head": outputs["head"], "anchors": outputs["anchor_generator"]},
        )  # fmt: skip
    rescaled = [
        resize_boxes(props.float(), size, original)
        for props, size, original in zip(paper, sizes, original_sizes, strict=True)
    ]
    return ImagePrediction.batch(image_ids, detections, rescaled)


# --- batched post-processing (torchvision's, same outputs) ----------------------------------


def _clip(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """``box_ops.clip_boxes_to_image`` with per-box bounds: ``boxes`` (..., 4) xyxy;
    ``heights``/``widths`` broadcast against ``boxes[..., 0]``."""
    x = boxes[..., 0::2].clamp(min=0).minimum(widths.unsqueeze(-1))
    y = boxes[..., 1::2].clamp(min=0).minimum(heights.unsqueeze(-1))
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def _bounds(image_shapes: list[tuple[int, int]], like: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) heights and widths of ``image_shapes`` on ``like``'s device and dtype."""
    # asynchronous copies (coorddet.device): no host sync on a GPU
    heights = ints_to_device([shape[0] for shape in image_shapes], like.device)
    widths = ints_to_device([shape[1] for shape in image_shapes], like.device)
    return heights.to(like.dtype), widths.to(like.dtype)


def _padded(boxes: list[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """``boxes`` (K_i, 4) per image as one zero-padded (N, max K_i, 4) tensor of ``like``'s
    dtype (float32 at least: ground truth is never rounded to bf16), and the (N, max K_i)
    mask of the real ones."""
    counts = ints_to_device([b.shape[0] for b in boxes], like.device)
    most = max([b.shape[0] for b in boxes] + [1])  # a row even when no image has boxes
    padded = like.new_zeros((len(boxes), most, 4), dtype=box_dtype(like.dtype))
    for image, image_boxes in enumerate(boxes):
        padded[image, : image_boxes.shape[0]] = image_boxes
    real = torch.arange(most, device=like.device)[None, :] < counts[:, None]
    return padded, real


def _match(gt: Tensor, real: Tensor, boxes: Tensor, matcher: Matcher) -> tuple[Tensor, Tensor]:
    """torchvision's ``Matcher(box_iou(gt, boxes))`` for a batch of images at once.

    ``gt``: (N, G, 4) ground truth, zero-padded, ``real`` (N, G) marking the real ones;
    ``boxes``: (N, B, 4). Returns (N, B) matches as the matcher gives them image by image
    (an index into the image's ground truth, ``BELOW_LOW_THRESHOLD`` or
    ``BETWEEN_THRESHOLDS``; ``BELOW_LOW_THRESHOLD`` everywhere in an image without ground
    truth) and the matched ground-truth boxes (zeros where there is no match). The IoU is
    ``box_ops.box_iou`` on the batch, element by element the same bits as image by image;
    padded rows score -1, below every real IoU, so maxima and ties fall as image by image.
    """
    iou = box_ops.box_iou(gt, boxes)  # (N, G, B): torchvision >= 0.24 takes batches
    iou = torch.where(real[:, :, None], iou, torch.full_like(iou, -1.0))
    values, matches = iou.max(dim=1)
    best = matches.clone()
    matches = matches.masked_fill(values < matcher.low_threshold, matcher.BELOW_LOW_THRESHOLD)
    between = (values >= matcher.low_threshold) & (values < matcher.high_threshold)
    matches = matches.masked_fill(between, matcher.BETWEEN_THRESHOLDS)
    if matcher.allow_low_quality_matches:
        highest = iou.max(dim=2)[0]  # each ground-truth box's best IoU, ties included below
        ties = ((iou == highest[:, :, None]) & real[:, :, None]).any(dim=1)
        matches = torch.where(ties, best, matches)
    index = matches.clamp(min=0)[:, :, None].expand(-1, -1, 4)
    return matches, torch.gather(gt, 1, index)


class BatchedRegionProposalNetwork(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose ``filter_proposals`` clips and thresholds the whole
    batch at once and whose ``assign_targets_to_anchors`` matches it at once; same proposals,
    scores, labels and boxes as torchvision's (``box_similarity`` is ``box_iou``, as
    torchvision sets it)."""

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        # The anchor generator gives every image of a batch the same anchors (the padded
        # batch's grid), so they stack.
        gt, real = _padded([t["boxes"] for t in targets], anchors[0])
        matches, matched = _match(gt, real, torch.stack(anchors), self.proposal_matcher)
        labels = (matches >= 0).to(torch.float32)
        labels = labels.masked_fill(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0)
        return list(labels.unbind(0)), list(matched.to(torch.float32).unbind(0))

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [
                torch.full((n,), index, dtype=torch.int64, device=device)
                for index, n in enumerate(num_anchors_per_level)
            ]
        )
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels[top_n_idx]
        heights, widths = _bounds(image_shapes, proposals)
        boxes = _clip(proposals[batch_idx, top_n_idx], heights[:, None], widths[:, None])
        keep = (
            (boxes[..., 2] - boxes[..., 0] >= self.min_size)
            & (boxes[..., 3] - boxes[..., 1] >= self.min_size)
            & (scores >= self.score_thresh)
        )
        single_level = len(num_anchors_per_level) == 1
        top_n = self.post_nms_top_n()
        final_boxes: list[Tensor] = []
        final_scores: list[Tensor] = []
        for image in range(num_images):
            kept = keep[image]
            image_boxes, image_scores = boxes[image][kept], scores[image][kept]
            if single_level:  # batched_nms over one level is nms (offsets of 0)
                order = box_ops.nms(image_boxes, image_scores, self.nms_thresh)
            else:
                image_levels = levels[image][kept]
                order = box_ops.batched_nms(
                    image_boxes, image_scores, image_levels, self.nms_thresh
                )
            order = order[:top_n]
            final_boxes.append(image_boxes[order])
            final_scores.append(image_scores[order])
        return final_boxes, final_scores


class BatchedRoIHeads(RoIHeads):
    """``RoIHeads`` whose ``postprocess_detections`` clips and thresholds the whole batch at
    once and whose ``assign_targets_to_proposals`` matches it at once; same detections,
    matches and labels as torchvision's."""

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        gt, real = _padded(gt_boxes, proposals[0])
        boxes, _ = _padded(proposals, proposals[0])
        matches, _ = _match(gt, real, boxes, self.proposal_matcher)
        index = matches.clamp(min=0)
        labels = torch.zeros_like(index)
        for image, image_labels in enumerate(gt_labels):
            if image_labels.numel() > 0:
                labels[image] = image_labels.to(torch.int64)[index[image]]
        labels = labels.masked_fill(matches == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0)
        labels = labels.masked_fill(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1)
        matched_idxs: list[Tensor] = []
        all_labels: list[Tensor] = []
        for image, image_proposals in enumerate(proposals):
            count = image_proposals.shape[0]
            matched_idxs.append(index[image, :count])
            all_labels.append(labels[image, :count])
        return matched_idxs, all_labels

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        counts = [boxes_in_image.shape[0] for boxes_in_image in proposals]
        # float32 boxes under autocast (coorddet.fp32_boxes); a no-op in float32
        box_regression = box_regression.to(box_dtype(box_regression.dtype))
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # (R, classes, 4)
        pred_scores = F.softmax(class_logits, -1)
        heights, widths = _bounds(image_shapes, pred_boxes)
        per_box = ints_to_device(counts, device)
        heights = heights.repeat_interleave(per_box)[:, None]
        widths = widths.repeat_interleave(per_box)[:, None]
        # Class 0 is the background: dropped, as torchvision does.
        boxes = _clip(pred_boxes, heights, widths)[:, 1:]
        scores = pred_scores[:, 1:]
        labels = torch.arange(1, num_classes, device=device).expand_as(scores)
        keep = (
            (scores > self.score_thresh)
            & (boxes[..., 2] - boxes[..., 0] >= 1e-2)
            & (boxes[..., 3] - boxes[..., 1] >= 1e-2)
        )
        all_boxes: list[Tensor] = []
        all_scores: list[Tensor] = []
        all_labels: list[Tensor] = []
        start = 0
        for count in counts:
            kept = keep[start : start + count]
            image_boxes = boxes[start : start + count][kept]
            image_scores = scores[start : start + count][kept]
            image_labels = labels[start : start + count][kept]
            order = box_ops.batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)
            order = order[: self.detections_per_img]
            all_boxes.append(image_boxes[order])
            all_scores.append(image_scores[order])
            all_labels.append(image_labels[order])
            start += count
        return all_boxes, all_scores, all_labels


def _sampling(module: RegionProposalNetwork | RoIHeads) -> dict[str, float]:
    """The matcher and sampler settings an RPN or RoI heads was built with, as its
    constructor's keyword arguments."""
    return {
        "fg_iou_thresh": module.proposal_matcher.high_threshold,
        "bg_iou_thresh": module.proposal_matcher.low_threshold,
        "batch_size_per_image": module.fg_bg_sampler.batch_size_per_image,
        "positive_fraction": module.fg_bg_sampler.positive_fraction,
    }


def use_batched_postprocessing(model: FasterRCNN) -> FasterRCNN:
    """Give ``model`` (in place, and returned) a :class:`BatchedRegionProposalNetwork` and
    :class:`BatchedRoIHeads` built from its own RPN's and RoI heads' submodules and settings,
    so its parameters, ``state_dict`` keys and outputs stay the same."""
    rpn = model.rpn
    batched_rpn = BatchedRegionProposalNetwork(
        rpn.anchor_generator,
        rpn.head,
        **_sampling(rpn),
        pre_nms_top_n=dict(rpn._pre_nms_top_n),
        post_nms_top_n=dict(rpn._post_nms_top_n),
        nms_thresh=rpn.nms_thresh,
        score_thresh=rpn.score_thresh,
    )
    heads = model.roi_heads
    batched_heads = BatchedRoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        **_sampling(heads),
        bbox_reg_weights=heads.box_coder.weights,
        score_thresh=heads.score_thresh,
        nms_thresh=heads.nms_thresh,
        detections_per_img=heads.detections_per_img,
    )
    batched_rpn.train(rpn.training)
    batched_heads.train(heads.training)
    model.rpn, model.roi_heads = batched_rpn, batched_heads
    return model
