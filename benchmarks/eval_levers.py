"""Inference speed and metrics of trained checkpoints under other test-time model settings.

For each checkpoint and each variant (``--variant "rpn_post_nms_top_n_test=50"``; the
checkpoint's own settings always come first), runs ``coorddet.evaluate``'s inference at batch
64 on a split and scores it, so a speed lever's cost in accuracy is measured, not guessed:

    python benchmarks/eval_levers.py runs/paper/uniform/*/checkpoints/last.ckpt \\
        --data data/paper/uniform --variant rpn_post_nms_top_n_test=50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from pycocotools.coco import COCO

from coorddet.checkpoint import load_checkpoint
from coorddet.data import CocoDataset, collate_detection
from coorddet.dataset_layout import annotation_file
from coorddet.inference import predict_with_proposals
from coorddet.metrics import evaluate_records
from coorddet.system import configure_memory, configure_threads, fix_threads

KEYS = ("map", "mar_100", "rpn_iou", "det_iou", "gt_iou")


def parse_variant(text: str) -> dict[str, int | float]:
    options = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        options[key] = float(value) if "." in value else int(value)
    return options


def run(model, batches, coco, repeats: int) -> tuple[float, dict[str, float]]:
    seconds = []
    for _ in range(repeats):
        records = []
        started = time.perf_counter()
        for images, ids in batches:
            records += predict_with_proposals(model, images, image_ids=ids)
        seconds.append(time.perf_counter() - started)
    images = sum(len(ids) for _, ids in batches)
    return images / statistics.median(seconds), evaluate_records(coco, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,...]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    configure_memory()  # as train.py and coorddet.evaluate do
    if args.threads:
        fix_threads(args.threads)
    else:
        configure_threads()
    dataset = CocoDataset(args.data, args.split)
    coco = COCO(str(annotation_file(args.data, args.split)))
    batches = []
    for start in range(0, len(dataset), 64):
        images, targets = collate_detection(
            [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
        )
        batches.append((images, [int(t["image_id"]) for t in targets]))
    variants = [("checkpoint", {})] + [(text, parse_variant(text)) for text in args.variant]
    print(f"{torch.get_num_threads()} threads, {len(dataset)} images, batch 64")
    print(f"{'checkpoint':48s} {'variant':32s} {'img/s':>7s} " + " ".join(f"{k:>8s}" for k in KEYS))
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        for name, options in variants:
            model = checkpoint.build_model(**options)
            speed, metrics = run(model, batches, coco, args.repeats)
            values = " ".join(f"{metrics[k]:8.4f}" for k in KEYS)
            print(f"{str(path)[-48:]:48s} {name:32s} {speed:7.1f} {values}", flush=True)


if __name__ == "__main__":
    main()
