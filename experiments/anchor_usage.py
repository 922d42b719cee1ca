"""Which anchors a released-RPN checkpoint's rpn_iou proposals come from (the released
protocol's anchor layout).

For each checkpoint (``rpn: released`` models, e.g. the ladder's R0/R1 runs): over the first
``--images`` images of a split, the top-10 proposals after NMS at 0.8 (the ``rpn_iou``
proposals), counted by the index of the anchor they were moved from (0-8, the templates of
``coorddet.released.TEMPLATES``), with the share lying inside the canvas and their mean best
IoU with the ground truth.

    python experiments/anchor_usage.py --data data/paper_protocol/placement \\
        runs/paper_protocol/R0/baseline-s0/checkpoints/last.ckpt ...
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou, nms

from coorddet.checkpoint import load_checkpoint
from coorddet.data import CocoDataset
from coorddet.released import NMS_IOU, ReleasedRegionProposalNetwork


def usage(model: torch.nn.Module, dataset: CocoDataset, images: int) -> dict:
    """Anchor index counts, inside share and mean best IoU of the top-10 proposals."""
    rpn = model.rpn
    counts: Counter[int] = Counter()
    inside, ious = 0, []
    with torch.no_grad():
        for index in range(min(images, len(dataset))):
            image, target = dataset[index]
            image_list, _ = model.transform([image])
            maps = [model.backbone(image_list.tensors)]
            objectness, deltas = rpn.head(maps)
            anchors = rpn.anchor_generator(image_list, maps)
            k = rpn.anchor_generator.num_anchors_per_location()[0]
            scores, deltas = concat_box_prediction_layers(objectness, deltas)
            moved = rpn.box_coder.decode(deltas, anchors).view(-1, 4)
            keep = nms(moved, scores.view(-1).sigmoid(), NMS_IOU)[:10]
            counts.update((keep % k).tolist())
            boxes = moved[keep]
            inside += int(((boxes[:, :2] >= 0).all(1) & (boxes[:, 2:] <= 63).all(1)).sum())
            ious += box_iou(boxes, target["boxes"]).amax(1).tolist()
    total = sum(counts.values())
    return {
        "anchors": {a: counts[a] / total for a in range(k)},
        "inside": inside / total,
        "mean_iou": sum(ious) / len(ious),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python experiments/anchor_usage.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoints", nargs="+", help="last.ckpt files of rpn: released runs")
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--split", default="test", help="split (default: test)")
    parser.add_argument("--images", type=int, default=200, help="images to look at (default: 200)")
    args = parser.parse_args(argv)
    dataset = CocoDataset(args.data, args.split)
    print(
        "| checkpoint | " + " | ".join(f"anchor {a}" for a in range(9)) + " | inside | mean IoU |"
    )
    print("|---|" + "---|" * 11)
    for path in args.checkpoints:
        model = load_checkpoint(path).build_model().eval()
        if not isinstance(model.rpn, ReleasedRegionProposalNetwork):
            parser.error(f"{path}: not an rpn: released model")
        result = usage(model, dataset, args.images)
        shares = " | ".join(f"{share:.0%}" for share in result["anchors"].values())
        print(f"| {path} | {shares} | {result['inside']:.0%} | {result['mean_iou']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
