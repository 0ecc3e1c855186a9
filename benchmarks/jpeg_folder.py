"""An ImageNet-like image folder from real photographs: crops of the sample photographs that
scikit-image ships, rescaled to ImageNet's typical size (about 400x350) and saved as JPEG at
quality 90, one class per photograph.

    python -m benchmarks.jpeg_folder --out DIR --train 2000 --val 200
"""

from __future__ import annotations

import argparse
import os

import numpy as np

# colour photographs first; grayscale ones are repeated to three channels
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins", "moon", "brick", "grass",
          "gravel")


def photographs() -> list[np.ndarray]:
    """scikit-image's sample photographs as uint8 RGB arrays."""
    import skimage.data

    out = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        out.append(image[..., :3].astype(np.uint8))
    return out


def variant(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `photo` (30-100% of its area) rescaled to about 400x350, maybe
    mirrored."""
    from PIL import Image

    h, w = photo.shape[:2]
    area = rng.uniform(0.3, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    ch = int(min(h, np.sqrt(area / aspect)))
    cw = int(min(w, np.sqrt(area * aspect)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out_w = int(np.clip(rng.normal(400, 40), 300, 500))
    out_h = int(np.clip(rng.normal(350, 35), 260, 440))
    crop = Image.fromarray(photo[top:top + ch, left:left + cw])
    image = np.asarray(crop.resize((out_w, out_h), Image.BILINEAR))
    return image[:, ::-1] if rng.random() < 0.5 else image


def write_folder(root: str, train: int, val: int = 0, classes: int = len(PHOTOS),
                 seed: int = 0, quality: int = 90) -> str:
    """root/train/CLASS/*.jpg (and root/val/... when val > 0), `train` and `val` images in all,
    spread over `classes` photographs; returns root."""
    from PIL import Image

    if not 1 <= classes <= len(PHOTOS):
        raise ValueError(f"classes={classes}; this folder has 1 to {len(PHOTOS)} photographs")
    photos = photographs()[:classes]
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for k in range(count):
            c = k % classes
            folder = os.path.join(root, split, f"{c:02d}_{PHOTOS[c]}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(variant(photos[c], rng)).save(
                os.path.join(folder, f"{split}_{k:06d}.jpg"), quality=quality)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=0)
    parser.add_argument("--classes", type=int, default=len(PHOTOS))
    args = parser.parse_args(argv)
    print(write_folder(args.out, args.train, args.val, args.classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
