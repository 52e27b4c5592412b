"""Print pip requirement lines taken from pyproject.toml, one per line.

    python3 requirements.py pyproject.toml                      # core dependencies
    python3 requirements.py pyproject.toml --extra build --no-core
    python3 requirements.py pyproject.toml --exclude onnxruntime  # e.g. for onnxruntime-gpu

The Dockerfile installs dependencies from this output before it copies the source, so
the dependency layers stay cached until pyproject.toml changes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="optional-dependency group to add")
    parser.add_argument("--no-core", action="store_true", help="leave out [project].dependencies")
    parser.add_argument("--exclude", action="append", default=[], help="distribution name to leave out")
    args = parser.parse_args()

    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = [] if args.no_core else list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in args.extra:
        if extra not in optional:
            parser.error(f"no extra {extra!r} in {args.pyproject} (have: {', '.join(sorted(optional))})")
        requirements += optional[extra]
    excluded = {e.lower().replace("_", "-") for e in args.exclude}
    for requirement in requirements:
        if _name(requirement) not in excluded:
            print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
