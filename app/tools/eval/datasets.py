"""Labelled image sets for `effnet eval`: four layouts, one list of (path, class index).

Layouts (`--format`, or detected):

* ``folder``  ImageFolder tree: ``DIR/<class>/<image>``; ``<class>`` is a WordNet id
  (``n01440764``), a class index (``0``..``999``, the logit position) or an exact class name.
* ``csv``     ``path,label`` rows (a header row is allowed); paths relative to the CSV's
  folder; label as above.
* ``valtxt``  ImageNet val as ``val.txt``: ``<file> <label>`` lines (Caffe's convention:
  the 0-based index in sorted-WordNet-id order, which is this repository's logit order).
* ``loc``     ImageNet val with Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``;
  the first token of PredictionString is the WordNet id); images ``<ImageId>.JPEG``.
* ``ilsvrc``  ImageNet val with the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line i
  is the 1-based *ILSVRC2012_ID* of ``ILSVRC2012_val_<i:08d>.JPEG``. Those ids follow the
  devkit's ``meta.mat`` order, not the sorted-wnid order, so the devkit's own mapping is
  required: ``meta.mat`` (read with scipy) or a ``map_clsloc.txt`` (``<wnid> <id> <name>``),
  given with ``--synsets`` or lying next to the ground-truth file. Nothing is guessed.

For the list layouts, listed images that are not on disk are skipped and counted
(``missing``), so a partial copy of ImageNet val evaluates what it has. Files that exist but
cannot be decoded are scored as errors by the runner, not here.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from importlib import resources

FORMATS = ("auto", "folder", "csv", "valtxt", "loc", "ilsvrc")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
VAL_TXT = "val.txt"
WNID_RE = re.compile(r"^n\d{8}$")
IMAGENET_VAL = "ImageNet-1k val"


class DatasetError(Exception):
    """The data cannot be evaluated as given; the message says why."""


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids in logit order (sorted), shipped with the build step's data."""
    try:
        path = resources.files("effnet_build") / "data" / "imagenet_wnids.txt"
        wnids = path.read_text(encoding="utf-8").split()
    except (ModuleNotFoundError, OSError):
        raise DatasetError(f"cannot read the WordNet id table {path}") from None
    if len(wnids) != 1000:
        raise DatasetError(f"{path} must hold 1000 WordNet ids")
    return wnids


class LabelResolver:
    """Turns a dataset's label (index, WordNet id or class name) into the model's logit index."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self._wnids: dict[str, int] | None = None
        self._names: dict[str, list[int]] = {}
        self._lower: dict[str, list[int]] = {}
        for i, name in enumerate(labels):
            self._names.setdefault(name, []).append(i)
            self._lower.setdefault(name.lower(), []).append(i)

    @property
    def wnids(self) -> dict[str, int]:
        if self._wnids is None:
            if len(self.labels) != 1000:
                raise DatasetError("WordNet id labels need a 1000-class ImageNet model")
            self._wnids = {w: i for i, w in enumerate(imagenet_wnids())}
        return self._wnids

    def resolve(self, token: str) -> int:
        t = token.strip()
        if re.fullmatch(r"\d+", t):
            i = int(t)
            if i >= len(self.labels):
                raise DatasetError(f"class index {i} is out of range 0..{len(self.labels) - 1}")
            return i
        if WNID_RE.match(t):
            if t not in self.wnids:
                raise DatasetError(f"{t} is not one of the 1000 ImageNet-1k WordNet ids")
            return self.wnids[t]
        hits = self._names.get(t) or self._lower.get(t.lower()) or []
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DatasetError(f"class name {t!r} is ambiguous (indices {hits}); use the index or WordNet id")
        raise DatasetError(f"label {t!r} is neither a class index, an ImageNet WordNet id nor a class name")


@dataclass
class Sample:
    path: Path
    label: int
    raw: str  # the label as the dataset wrote it


@dataclass
class Dataset:
    name: str
    format: str
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)  # listed but not on disk (skipped)
    source: str = ""  # the file or folder it came from


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def load_folder(root: Path, resolver: LabelResolver) -> Dataset:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class folders")
    samples: list[Sample] = []
    for folder in classes:
        label = resolver.resolve(folder.name)
        samples += [Sample(p, label, folder.name) for p in sorted(folder.rglob("*")) if _is_image(p)]
    return Dataset(root.name, "folder", samples, source=str(root))


def _labelled_rows(rows: list[tuple[str, str]], base: Path, resolver: LabelResolver, what: str) -> tuple[list[Sample], list[str]]:
    samples, missing, bad = [], [], []
    for lineno, (name, label) in enumerate(rows, 1):
        try:
            index = resolver.resolve(label)
        except DatasetError as exc:
            bad.append(f"{what} row {lineno}: {exc}")
            continue
        path = Path(name) if Path(name).is_absolute() else base / name
        if path.is_file():
            samples.append(Sample(path, index, label))
        else:
            missing.append(name)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError("; ".join(bad[:3]) + more)
    return samples, missing


def load_csv(path: Path, resolver: LabelResolver, images: Path | None = None) -> Dataset:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if any(len(r) < 2 for r in rows):
        raise DatasetError(f"{path}: every row must be `path,label`")
    samples, missing = _labelled_rows([(r[0].strip(), r[1].strip()) for r in rows], images or path.parent, resolver, path.name)
    return Dataset(path.parent.name or path.stem, "csv", samples, missing, str(path))


def load_val_txt(path: Path, resolver: LabelResolver, images: Path | None = None) -> Dataset:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path.name} line {lineno}: expected `<file> <label>`")
        rows.append((parts[0], parts[1]))
    base = images or _first_dir(path.parent, [path.parent / "val", path.parent], rows[0][0] if rows else None)
    samples, missing = _labelled_rows(rows, base, resolver, path.name)
    return Dataset(IMAGENET_VAL, "valtxt", samples, missing, str(path))


def _first_dir(default: Path, candidates: list[Path], probe: str | None) -> Path:
    """The first candidate folder that holds the probe file (the first listed image)."""
    if probe:
        for d in candidates:
            if (d / probe).is_file():
                return d
    return default


def _find_stem(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for ext in (".JPEG", ".jpg", ".jpeg", ".png", ""):
            p = d / (stem + ext)
            if p.is_file():
                return p
    return None


def load_loc(path: Path, resolver: LabelResolver, images: Path | None = None) -> Dataset:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected the header `ImageId,PredictionString`")
        rows = [(r["ImageId"].strip(), (r["PredictionString"] or "").split()) for r in reader]
    dirs = [images] if images else [path.parent, path.parent / "val", path.parent / "ILSVRC" / "Data" / "CLS-LOC" / "val"]
    samples, missing = [], []
    for image_id, tokens in rows:
        if not tokens:
            raise DatasetError(f"{path.name}: {image_id} has an empty PredictionString")
        label = resolver.resolve(tokens[0])
        found = _find_stem(dirs, image_id)
        if found is None:
            missing.append(image_id)
        else:
            samples.append(Sample(found, label, tokens[0]))
    return Dataset(IMAGENET_VAL, "loc", samples, missing, str(path))


def read_synsets(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WordNet id, from the devkit's meta.mat or a map_clsloc.txt."""
    if path.suffix.lower() == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError:
            raise DatasetError(f"reading {path.name} needs scipy (pip install scipy), or pass a map_clsloc.txt") from None
        try:
            meta = loadmat(str(path), squeeze_me=True)["synsets"]
            leaves = [m for m in meta if int(m["num_children"]) == 0]
            mapping = {int(m["ILSVRC2012_ID"]): str(m["WNID"]) for m in leaves}
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise DatasetError(f"{path} is not the devkit's meta.mat: {exc}") from None
    else:
        mapping = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not WNID_RE.match(parts[0]) or not parts[1].isdigit():
                raise DatasetError(f"{path.name} line {lineno}: expected `<wnid> <ILSVRC2012_ID> [name]`")
            mapping[int(parts[1])] = parts[0]
    if len(mapping) != 1000 or set(mapping) != set(range(1, 1001)):
        raise DatasetError(f"{path} must map ILSVRC2012 ids 1..1000 to WordNet ids (found {len(mapping)})")
    return mapping


def load_ilsvrc(path: Path, resolver: LabelResolver, images: Path | None = None, synsets: Path | None = None) -> Dataset:
    if synsets is None:
        for cand in (path.parent / "meta.mat", path.parent / "map_clsloc.txt"):
            if cand.is_file():
                synsets = cand
                break
        else:
            raise DatasetError(
                f"{path.name} holds ILSVRC2012 ids in the devkit's meta.mat order, not class indices; "
                "pass the devkit's meta.mat or a map_clsloc.txt with --synsets (or put one next to it), "
                f"or use {LOC_SOLUTION} / a val.txt instead"
            )
    ids = read_synsets(synsets)
    dirs = [images] if images else [path.parent, path.parent / "val"]
    samples, missing = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").split(), 1):
        if not line.isdigit() or int(line) not in ids:
            raise DatasetError(f"{path.name} entry {i}: {line!r} is not an ILSVRC2012 id 1..1000")
        wnid = ids[int(line)]
        stem = f"ILSVRC2012_val_{i:08d}"
        found = _find_stem(dirs, stem)
        if found is None:
            missing.append(stem)
        else:
            samples.append(Sample(found, resolver.resolve(wnid), wnid))
    return Dataset(IMAGENET_VAL, "ilsvrc", samples, missing, str(path))


def _detect(data: Path) -> tuple[str, Path]:
    """(format, label file or folder) for a path given without --format."""
    if data.is_file():
        name = data.name.lower()
        if "ground_truth" in name:
            return "ilsvrc", data
        if data.suffix.lower() == ".csv":
            with data.open(encoding="utf-8-sig") as f:
                header = f.readline()
            return ("loc" if header.replace(" ", "").startswith("ImageId,PredictionString") else "csv"), data
        if data.suffix.lower() == ".txt":
            return "valtxt", data
        raise DatasetError(f"{data}: not a folder, a .csv or a .txt label file")
    if not data.is_dir():
        raise DatasetError(f"{data} does not exist")
    for fmt, fname in (("ilsvrc", GROUND_TRUTH), ("loc", LOC_SOLUTION), ("valtxt", VAL_TXT)):
        if (data / fname).is_file():
            return fmt, data / fname
    # A CSV at the top wins over sub-folders: `labels.csv` + `images/` is a CSV set, not a class folder.
    csvs = sorted(data.glob("*.csv"))
    if (data / "labels.csv").is_file():
        return _detect(data / "labels.csv")
    if len(csvs) == 1:
        return _detect(csvs[0])
    if any(p.is_dir() and not p.name.startswith(".") for p in data.iterdir()):
        return "folder", data
    raise DatasetError(f"{data}: no class folders, no single CSV, {VAL_TXT}, {LOC_SOLUTION} or {GROUND_TRUTH}")


def open_dataset(
    data: Path,
    resolver: LabelResolver,
    fmt: str = "auto",
    *,
    images: Path | None = None,
    synsets: Path | None = None,
    name: str | None = None,
) -> Dataset:
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt, target = _detect(data)
    elif fmt == "folder":
        target = data
    elif data.is_dir():
        default = {"csv": "labels.csv", "valtxt": VAL_TXT, "loc": LOC_SOLUTION, "ilsvrc": GROUND_TRUTH}[fmt]
        target = data / default
        if fmt == "csv" and not target.is_file():
            csvs = sorted(data.glob("*.csv"))
            target = csvs[0] if len(csvs) == 1 else target
    else:
        target = data
    if fmt != "folder" and not target.is_file():
        raise DatasetError(f"{target} does not exist")
    if fmt == "folder":
        ds = load_folder(target, resolver)
    elif fmt == "csv":
        ds = load_csv(target, resolver, images)
    elif fmt == "valtxt":
        ds = load_val_txt(target, resolver, images)
    elif fmt == "loc":
        ds = load_loc(target, resolver, images)
    else:
        ds = load_ilsvrc(target, resolver, images, synsets)
    if name:
        ds.name = name
    if not ds.samples:
        raise DatasetError(f"{ds.source}: no images found" + (f" ({len(ds.missing)} listed but missing)" if ds.missing else ""))
    return ds
