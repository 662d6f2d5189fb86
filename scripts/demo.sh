#!/usr/bin/env bash
# Set up and run the demo: answer a question about a real CT slice (pydicom's bundled CT_small.dcm).
# Until the built-in demo model lands, the model is a tiny random checkpoint, so the answer is noise:
# the demo shows the whole pipeline (DICOM decoding, preprocessing, expert routing, streaming).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
MODEL=.demo/tiny-phi-random
if [ ! -d "$MODEL" ]; then
  .venv/bin/medmoe-edge init-random --preset tiny-phi --out "$MODEL" --seed 0
fi
CT=$(.venv/bin/python -c "from pydicom.data import get_testdata_file; print(get_testdata_file('CT_small.dcm', download=False))")
.venv/bin/medmoe-edge run --model "$MODEL" --image "$CT" --question "Is there a lesion in this CT slice?" --max-new-tokens 16
