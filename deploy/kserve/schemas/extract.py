"""Regenerate the vendored KServe schemas from a kserve/kserve checkout.

    python deploy/kserve/schemas/extract.py ~/src/kserve                 # a work tree
    python deploy/kserve/schemas/extract.py ~/src/kserve --rev v0.20.0   # any clone, bare too

Writes clusterservingruntime.json and inferenceservice.json beside this script: the
`openAPIV3Schema` of each CRD in config/crd/full/, as compact JSON. Subtrees that the
manifests here never use (whole PodSpecs of explainer/transformer/canary, affinity,
the deprecated per-framework predictors, status, ...) are cut down to a bare type,
which keeps the InferenceService schema at ~25 KB instead of 640 KB. A manifest that
starts using a pruned field still validates (as "any object"); move it out of PRUNE to
have it checked. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRD_DIR = "config/crd/full"

# output file -> (CRD file, served version, property paths to prune)
TARGETS = {
    "clusterservingruntime.json": (
        "serving.kserve.io_clusterservingruntimes.yaml",
        "v1alpha1",
        ["status", "spec.affinity", "spec.workerSpec"],
    ),
    "inferenceservice.json": (
        "serving.kserve.io_inferenceservices.yaml",
        "v1beta1",
        ["status", "spec.canary", "spec.explainer", "spec.transformer"]
        + [
            f"spec.predictor.{k}"
            for k in (
                "affinity", "containers", "initContainers", "volumes", "workerSpec",
                # deprecated framework-specific predictors; `model` replaces them
                "huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch",
                "sklearn", "tensorflow", "triton", "xgboost",
            )
        ],
    ),
}


def _read(source: Path, rev: str | None, name: str) -> str:
    if rev is None:
        return (source / CRD_DIR / name).read_text()
    # `git -C` works on a bare clone as well as on a work tree.
    return subprocess.run(
        ["git", "-C", str(source), "show", f"{rev}:{CRD_DIR}/{name}"],
        check=True, capture_output=True, text=True,
    ).stdout


def _pruned(node: dict) -> dict:
    # Marked preserve-unknown-fields: "anything goes here", which is what pruning means,
    # and the test's strictness pass leaves such nodes open.
    out: dict = {"type": node.get("type", "object"), "description": "pruned by extract.py"}
    if out["type"] == "object":
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif out["type"] == "array" and isinstance(node.get("items"), dict):
        out["items"] = _pruned(node["items"])
    return out


def _prune(schema: dict, path: str) -> None:
    *parents, leaf = path.split(".")
    node = schema
    for key in parents:
        node = node["properties"][key]
    if leaf not in node.get("properties", {}):
        # Fail loudly: a renamed field would otherwise silently stay unpruned or vanish.
        raise SystemExit(f"prune path {path!r} not found in the schema")
    node["properties"][leaf] = _pruned(node["properties"][leaf])


def extract(crd_text: str, version: str, prune: list[str], comment: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the ISVC CRD is 2 MB: C is 6x faster
    crd = yaml.load(crd_text, Loader=loader)
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = entry["schema"]["openAPIV3Schema"]
    for path in prune:
        _prune(schema, path)
    return {"$comment": comment, **schema}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="kserve/kserve checkout or clone")
    ap.add_argument("--rev", help="git revision to read (default: the work tree's files)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    label = args.rev or "work tree"
    if args.rev:
        sha = subprocess.run(["git", "-C", str(args.source), "rev-parse", f"{args.rev}^{{commit}}"],
                             check=True, capture_output=True, text=True).stdout.strip()
        label = f"{args.rev} ({sha})"
    for out_name, (crd_name, version, prune) in TARGETS.items():
        comment = (f"kserve/kserve {label} {CRD_DIR}/{crd_name}, {version} openAPIV3Schema; "
                   f"pruned: {', '.join(prune)}. Regenerate with deploy/kserve/schemas/extract.py.")
        schema = extract(_read(args.source, args.rev, crd_name), version, prune, comment)
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n"
        (args.out / out_name).write_text(text)
        print(f"{out_name}: {len(text):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
