#!/usr/bin/env bash
# The TensorRT check a user runs on a machine with an NVIDIA GPU (docs/TENSORRT.md):
# export the built-in demo model to TensorRT engines for this GPU, run them, verify them against
# the bundle's embedded reference trace, and write the figures to one JSON file to send back.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: ./gpu-check-<date>)
#
# Environment:
#   PY       interpreter with medmoe-edge installed (default: .venv/bin/python, else python3)
#   TARGET   rtx (TensorRT-RTX, default when tensorrt_rtx_bindings imports) or jetson (standard TensorRT)
#   PRECISION fp16 (default), fp32 or bf16 (Ampere or later)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
OUT=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
PRECISION=${PRECISION:-fp16}
CLI=("$(dirname "$PY")/medmoe-edge")
[ -x "${CLI[0]}" ] || CLI=(medmoe-edge)
die() { echo "gpu_check: error: $*" >&2; exit 1; }

[ -e "$OUT" ] && die "$OUT exists: pass another output directory"
CC=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")')
[ -n "$CC" ] || die "torch sees no CUDA GPU: install a CUDA build of torch (on Jetson: NVIDIA's torch for JetPack) and check nvidia-smi"
if [ -z "${TARGET:-}" ]; then
  if "$PY" -c 'import tensorrt_rtx_bindings' 2>/dev/null; then TARGET=rtx
  elif "$PY" -c 'import tensorrt' 2>/dev/null; then TARGET=jetson
  else die "no TensorRT: pip install 'medmoe-edge[tensorrt]' (RTX/A100-class GPUs) or JetPack's TensorRT (Jetson)"; fi
fi
mkdir -p "$OUT"
echo "gpu_check: GPU compute capability $CC, target $TARGET, $PRECISION -> $OUT"

CC_FLAG=()
[ "$TARGET" = rtx ] && CC_FLAG=(--compute-capability "$CC")
"${CLI[@]}" export --format tensorrt --model demo --target "$TARGET" "${CC_FLAG[@]}" --precision "$PRECISION" \
  --max-context 1024 --out "$OUT/bundle" --no-verify 2>&1 | tee "$OUT/export.log"
"${CLI[@]}" verify "$OUT/bundle" --device cuda --json > "$OUT/verify.json" 2> "$OUT/verify.log" || echo "gpu_check: verify FAILED (see $OUT/verify.json)"
"${CLI[@]}" run --model "$OUT/bundle" --runtime tensorrt --device cuda --image "$ROOT/examples/ct-lesion.png" \
  --question "Is there an abnormality in this image?" --max-new-tokens 64 --json > "$OUT/run.json" 2> "$OUT/run.log" || echo "gpu_check: run FAILED (see $OUT/run.log)"
"${CLI[@]}" run --model demo --runtime torch --device cuda --image "$ROOT/examples/ct-lesion.png" \
  --question "Is there an abnormality in this image?" --max-new-tokens 64 --json > "$OUT/run-torch.json" 2> "$OUT/run-torch.log" || true
GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)

"$PY" - "$OUT" "$CC" "$TARGET" "$PRECISION" "$GPU_NAME" <<'EOF'
import json, sys
from pathlib import Path
out, cc, target, precision, gpu = Path(sys.argv[1]), *sys.argv[2:]
def read(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
v, r, t = read("verify.json"), read("run.json"), read("run-torch.json")
m = json.loads((out / "bundle" / "manifest.json").read_text())
summary = {
    "gpu": gpu, "compute_capability": cc, "target": target, "precision": precision,
    "tensorrt": m["extra"]["tensorrt"], "engine_build_s": m["extra"]["tensorrt"].get("build_seconds"),
    "verify": None if v is None else {"passed": v.get("passed"), "metrics": v.get("metrics"), "n": v.get("n")},
    "tensorrt_run": None if r is None else {"answer": r.get("answer"), "timings": r.get("timings"), "memory": r.get("memory")},
    "torch_cuda_run": None if t is None else {"answer": t.get("answer"), "timings": t.get("timings")},
}
(out / "gpu-check.json").write_text(json.dumps(summary, indent=2))
tt = (summary["tensorrt_run"] or {}).get("timings") or {}
print(f"gpu_check: verify {'passed' if v and v.get('passed') else 'FAILED or not run'}; "
      f"TTFT {tt.get('time_to_first_token_s', float('nan')) * 1000:.1f} ms, decode {tt.get('decode_tokens_per_s') or float('nan'):.1f} tok/s")
print(f"gpu_check: send back {out / 'gpu-check.json'}")
EOF
