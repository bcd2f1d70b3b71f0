#!/usr/bin/env bash
# Build the NeMo-Aligner venv (README, "NeMo-Aligner plugins") once; a second run only checks it.
#
#   scripts/aligner_venv.sh [VENV_DIR]        # default: aligner-venv beside setup.py
#
# The packages are the `aligner` extra's (read from setup.py, so the two cannot drift), pinned by
# constraints-aligner.txt; PyPI's CUDA torchvision is removed (it breaks `import nemo` on CPU
# torch); the project goes in editable with --no-deps (its ortools needs a protobuf NeMo 2.3.3
# refuses). The venv counts as built when the marker file exists and its imports still work;
# anything else (a half-built venv from an interrupted run) is removed and built again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/aligner-venv}"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.nemo_plugins_aligner_built"
CHECK='import nemo_aligner, pytriton, nemo.collections.nlp, nemo_plugins.aligner.reward_server'

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "aligner venv: $VENV is built (marker $MARKER); nothing to do"
    exit 0
fi
if [[ -e "$VENV" ]]; then
    echo "aligner venv: $VENV exists without a working build; rebuilding it"
    rm -rf "$VENV"
fi

read -r -a PACKAGES < <("$PYTHON" - "$ROOT/setup.py" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
extras = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "EXTRAS")
print(" ".join(ast.literal_eval(extras.value)["aligner"]))  # specs hold no spaces
PY
)
start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$ROOT/constraints-aligner.txt" "${PACKAGES[@]}"
"$VENV/bin/pip" uninstall -q -y torchvision
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -c "$CHECK"
touch "$MARKER"
echo "aligner venv: built $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
