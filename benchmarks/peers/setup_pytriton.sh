#!/usr/bin/env bash
# Create (or reuse) the PyTriton peer's own venv: .cache/peers/pytriton-venv.
#
#     bash benchmarks/peers/setup_pytriton.sh          # prints the venv's python on success
#
# Its own venv because nvidia-pytriton 0.7.0 pins numpy<2 (the project's venv has numpy 2).
# Idempotent: a venv whose stamp file matches the pinned requirements is reused as it is;
# otherwise it is (re)built from scratch. Needs CPython 3.11 built with a shared libpython
# (pyenv's is: Py_ENABLE_SHARED=1); set PYTHON to choose the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PYTRITON_VENV:-$ROOT/.cache/peers/pytriton-venv}"
PYTHON="${PYTHON:-python3}"
PINS=(
  "nvidia-pytriton==0.7.0"
  "numpy==1.26.4"
  "onnxruntime==1.32.0"
  "pillow==13.0.0"
)
STAMP="$VENV/.peer-pins"
WANT="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ${PINS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

"$PYTHON" - <<'PY'
import sys, sysconfig
if sys.version_info[:2] != (3, 11):
    sys.exit(f"setup_pytriton.sh: need CPython 3.11 (PyTriton's python backend stub is built for it), got {sys.version.split()[0]}")
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    sys.exit("setup_pytriton.sh: this Python has no shared libpython; the stub needs one (see benchmarks/peers/README.md)")
PY

rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
"$VENV/bin/python" -c "import pytriton, numpy, onnxruntime, PIL" >&2
echo "$WANT" > "$STAMP"
echo "$VENV/bin/python"
