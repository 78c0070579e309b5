# Sourced by the benchmark scripts beside it: sets PYTHON to a Python that has torch. A PYTHON already set is
# kept (the GPU machine's host, whose python3 has torch and which cannot download); otherwise the venv
# JOINTDIFF_TORCH_VENV (default tools/reference/.venv) is made on first use (a large download).
if [ -z "${PYTHON:-}" ]; then
  VENV="${JOINTDIFF_TORCH_VENV:-$ROOT/tools/reference/.venv}"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch numpy safetensors
  fi
  PYTHON="$VENV/bin/python"
fi
