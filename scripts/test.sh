#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs).
# The llama.cpp tests need llama-cpp-python built with our patch: built here once (about
# 5 minutes on 2 cores) unless the environment already has a patched build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(0 if '+medmoe' in llama_cpp.__version__ else 1)" >/dev/null 2>&1; then
  bash scripts/build_llamacpp.sh cpu
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
