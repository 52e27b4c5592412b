"""A small labelled set of real photos, assembled from images that pip packages ship.

No download at run time: scikit-image bundles its sample photos in the wheel, and matplotlib
bundles grace_hopper.jpg in mpl-data/sample_data. Each photo is labelled by hand with the one
ImageNet-1k class a person would give it; `near` lists the classes a person could also defend
(ImageNet itself is single-label and noisy in exactly these places), so top-5 is the fairer
number on this set.

Left out on purpose: scikit-image's astronaut (no ImageNet class for a person in a space
suit), motorcycle_left/right (a sports motorbike; ImageNet has only moped and motor scooter),
clock_motion (a motion-blurred wall/analog clock), and the textures, microscopy and astronomy
images (no object class).

    python tests/eval/eval_photos.py OUT [--layout folder|csv|valtxt|loc|ilsvrc]

writes the set in one of the layouts `effnet eval` reads.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

# The build step's tables, wherever its package is (build/ in a checkout, effnet_build/ in a mutation copy).
DATA = resources.files("effnet_build") / "data"
WNIDS = (DATA / "imagenet_wnids.txt").read_text().split()
CLASSES = (DATA / "imagenet_classes.txt").read_text().splitlines()


@dataclass(frozen=True)
class Photo:
    key: str
    package: str  # the pip package that ships it
    file: str
    label: int  # ImageNet-1k class index (logit position)
    near: tuple[int, ...]  # defensible alternatives
    note: str

    @property
    def wnid(self) -> str:
        return WNIDS[self.label]

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    def path(self) -> Path | None:
        """Where the package keeps the file; None when the package is not installed."""
        try:
            if self.package == "scikit-image":
                import skimage

                return Path(skimage.__file__).parent / "data" / self.file
            if self.package == "matplotlib":
                import matplotlib

                return Path(matplotlib.get_data_path()) / "sample_data" / self.file
        except ImportError:
            return None
        raise ValueError(self.package)


PHOTOS = (
    Photo("chelsea", "scikit-image", "chelsea.png", 281, (282, 285),
          "Chelsea the cat, an orange tabby: 281 tabby; ImageNet's 282 tiger cat and 285 Egyptian cat are near-synonyms "
          "that models split their vote over"),
    Photo("coffee", "scikit-image", "coffee.png", 967, (968, 504),
          "a cup of espresso on a saucer: 967 espresso (968 cup, 504 coffee mug also defensible)"),
    Photo("rocket", "scikit-image", "rocket.jpg", 657, (744, 812),
          "a rocket launch: ImageNet has no 'rocket'; 657 missile is the closest class (744 projectile, 812 space shuttle)"),
    Photo("cameraman", "scikit-image", "camera.png", 872, (759,),
          "the classic grayscale 'cameraman': a man behind a camera on a tripod; 872 tripod (759 reflex camera)"),
    Photo("grace_hopper", "matplotlib", "grace_hopper.jpg", 652, (457, 906, 834),
          "Rear Admiral Grace Hopper in US Navy uniform: 652 military uniform, the label TensorFlow's label_image "
          "example gives it (457 bow tie, 906 Windsor tie, 834 suit are what a close crop also shows)"),
)

# The two photos whose class nobody would argue about: every pretrained Lite model has them in its top-5.
CORE = ("chelsea", "coffee")

# scikit-image photos left out of the labelled set: int8 calibrates on these, never on the photos it is checked on.
CALIBRATION_FILES = ("astronaut.png", "motorcycle_left.png", "motorcycle_right.png", "clock_motion.png",
                     "hubble_deep_field.jpg", "retina.jpg", "page.png", "horse.png")


def write_calibration_set(out: Path) -> list[Path]:
    """Copy the calibration photos that are installed into out; returns the copies."""
    try:
        import skimage
    except ImportError:
        return []
    src = Path(skimage.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in CALIBRATION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copies.append(out / name)
    return copies


def available(keys: tuple[str, ...] | None = None) -> list[Photo]:
    photos = [p for p in PHOTOS if keys is None or p.key in keys]
    return [p for p in photos if (src := p.path()) is not None and src.is_file()]


def _jpeg(src: Path) -> bytes:
    """ImageNet val is JPEG: re-encode (quality 95) for the val layouts."""
    img = Image.open(src)
    img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_set(out: Path, layout: str = "folder", photos: list[Photo] | None = None) -> list[Photo]:
    """Write the photos in one of `effnet eval`'s layouts; returns the photos written (in order)."""
    photos = available() if photos is None else photos
    out.mkdir(parents=True, exist_ok=True)
    if layout == "folder":  # ImageFolder by WordNet id, the files as the package ships them
        for p in photos:
            (out / p.wnid).mkdir(exist_ok=True)
            shutil.copyfile(p.path(), out / p.wnid / p.file)
    elif layout == "csv":  # path,label with all three label spellings
        (out / "images").mkdir(exist_ok=True)
        with (out / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for i, p in enumerate(photos):
                shutil.copyfile(p.path(), out / "images" / p.file)
                w.writerow([f"images/{p.file}", (p.label, p.wnid, p.name)[i % 3]])
    elif layout in ("valtxt", "loc", "ilsvrc"):  # ImageNet val: ILSVRC2012_val_<n>.JPEG, flat
        stems = [f"ILSVRC2012_val_{i:08d}" for i in range(1, len(photos) + 1)]
        for stem, p in zip(stems, photos):
            (out / f"{stem}.JPEG").write_bytes(_jpeg(p.path()))
        if layout == "valtxt":
            (out / "val.txt").write_text("".join(f"{s}.JPEG {p.label}\n" for s, p in zip(stems, photos)))
        elif layout == "loc":
            with (out / "LOC_val_solution.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["ImageId", "PredictionString"])
                for s, p in zip(stems, photos):
                    w.writerow([s, f"{p.wnid} 10 20 200 220 {p.wnid} 30 40 100 120 "])
        else:
            ids = synthetic_synsets()
            by_wnid = {w: i for i, w in ids.items()}
            (out / "map_clsloc.txt").write_text("".join(f"{ids[i]} {i} {CLASSES[WNIDS.index(ids[i])].replace(' ', '_')}\n" for i in sorted(ids)))
            (out / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{by_wnid[p.wnid]}\n" for p in photos))
    else:
        raise ValueError(f"unknown layout {layout}")
    return photos


def synthetic_synsets(seed: int = 7) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the tests: a fixed *shuffle*, so that an id read as a class index fails.

    NOT the devkit's real order (that comes from the user's meta.mat / map_clsloc.txt).
    """
    wnids = list(WNIDS)
    random.Random(seed).shuffle(wnids)
    return {i + 1: w for i, w in enumerate(wnids)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layout", default="folder", choices=["folder", "csv", "valtxt", "loc", "ilsvrc"])
    args = ap.parse_args(argv)
    photos = write_set(args.out, args.layout)
    for p in photos:
        print(f"{p.key:13} {p.label:4} {p.wnid} {p.name:18} {p.package}:{p.file}")
    missing = [p.key for p in PHOTOS if p not in photos]
    if missing:
        print(f"not available (package not installed): {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
