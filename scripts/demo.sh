#!/usr/bin/env bash
# Set up and run the demo: the built-in demo model answers a question about a real CT slice
# (pydicom's bundled CT_small.dcm). The demo model was trained on synthetic images only:
# not for clinical use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
CT=$(.venv/bin/python -c "from pydicom.data import get_testdata_file; print(get_testdata_file('CT_small.dcm', download=False))")
.venv/bin/medmoe-edge run --image "$CT" --question "what modality is this?"
