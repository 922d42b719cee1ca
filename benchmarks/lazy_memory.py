"""Peak memory of ``train.py`` on a photo dataset too large to decode into memory (lazy
decoding).

    python benchmarks/lazy_memory.py [--images 1000,2000,10000] [--size 640x480] [--out FILE.json]

For each image count, writes that many RGB JPEGs (coloured boxes on a smooth background) with
COCO annotations into a temporary folder (or ``--keep DIR``), then runs ``train.py`` on it
(``mnist-small``, images not resized, batch 2, 2 DataLoader workers, 30 training and 5
validation batches, ``data.decode: auto``; the validation split is 100 images for every count)
while sampling every 0.2 s the proportional set size (PSS: shared pages counted once) of the
training process and its workers, summed. It prints one row per count and with ``--out`` writes
them as JSON. Decoded into memory, the 10,000 images of 640x480 would take 9.2 GB; decoded
lazily, the peak should not grow with the count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from coorddet.system import process_tree

ROOT = Path(__file__).resolve().parents[1]


def write_photos(root: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """``count`` JPEGs in ``root/train`` and 100 in ``root/val`` (decoded into memory: the
    same for every count), with their JSON."""
    rng = np.random.default_rng(seed)
    background = np.linspace(20, 90, width, dtype=np.float32)[None, :, None]
    background = np.broadcast_to(background, (height, width, 3)).astype(np.uint8)
    ann_id = 0
    for split, n in (("train", count), ("val", 100)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(n):
            pixels = background.copy()
            for _ in range(3):
                w, h = (int(v) for v in rng.integers(30, 120, size=2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                category = int(rng.integers(1, 6))
                pixels[y : y + h, x : x + w] = (50 * category, 255 - 40 * category, 120)
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": index + 1, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
            name = f"{index:06d}.jpg"
            Image.fromarray(pixels).save(root / split / name, quality=85)
            images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        (root / "annotations").mkdir(exist_ok=True)
        categories = [{"id": i, "name": f"box{i}"} for i in range(1, 6)]
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))


def tree_pss_kb(pid: int) -> int:
    """PSS of ``pid`` and all its descendants, in kB (0 for processes gone meanwhile)."""
    total = 0
    for current in process_tree(pid):
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(data: Path, width: int, height: int) -> dict:
    config = {
        "seed": 0,
        "data": {"batch_size": 2, "num_workers": 2, "augment": False, "decode": "auto"},
        "model": {"backbone": "mnist-small", "min_size": min(width, height),
                  "max_size": max(width, height)},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 30,
                    "limit_val_batches": 5},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "train.py", "--config", str(config_file), "--data", str(data),
             "--out", str(Path(tmp) / "run"), "--quiet"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        peak = [0]

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_pss_kb(process.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, stderr = process.communicate()
        sampler.join()
        if process.returncode != 0:
            raise SystemExit(f"train.py failed: {stderr.strip().splitlines()[-1:]}")
    return {
        "peak_pss_mb": round(peak[0] / 1024, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,2000,10000", help="comma-separated image counts")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--keep", metavar="DIR", help="write (or reuse) the datasets here")
    parser.add_argument("--out", metavar="FILE.json", help="also write the rows as JSON")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for count in (int(c) for c in args.images.split(",")):
            data = base / f"photos-{count}-{width}x{height}"
            if not (data / "annotations" / "instances_val.json").is_file():
                started = time.perf_counter()
                write_photos(data, count, width, height)
                print(f"wrote {count} images in {time.perf_counter() - started:.0f} s", flush=True)
            decoded_gb = count * width * height * 3 / 1e9
            row = {"images": count, "size": f"{width}x{height}", "decoded_gb": round(decoded_gb, 2),
                   **measure(data, width, height)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
