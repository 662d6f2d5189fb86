#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs).
# The llama.cpp tests need llama-cpp-python built with our patch: scripts/build_llamacpp.sh
# builds it once (about 8 minutes on 2 cores) and reuses the cached wheel afterwards.
# LLAMACPP_TARGET picks the build (cpu, native, cuda, jetson; default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/build_llamacpp.sh "${LLAMACPP_TARGET:-cpu}"
# The import-layer contracts (pyproject.toml [tool.importlinter]); tests/test_layers.py also plants violations.
.venv/bin/python scripts/check_layers.py | tail -n 4
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
