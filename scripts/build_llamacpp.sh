#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 with the Med-MoE architectures (medmoe-phi2, medmoe-stablelm)
# and install it into a Python environment.
#
#   bash scripts/build_llamacpp.sh [cpu|native|cuda|jetson]
#
#   cpu     portable x86-64 build (AVX2/FMA/F16C baseline, no -march=native)   [default]
#   native  tuned for this machine's CPU (-march=native); not portable to older CPUs
#   cuda    NVIDIA GPU build (set CUDA_ARCHS, e.g. 90 for H100, to skip the default arch list)
#   jetson  Jetson Orin (sm_87); build on the device itself
#
# Environment:
#   PYTHON      interpreter to install into (default: .venv/bin/python if present, else python3)
#   JOBS        parallel compile jobs (default 2)
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES for the cuda target
#   CMAKE_ARGS  extra CMake options, appended to the target's
#   SDIST       a local llama_cpp_python-0.3.36.tar.gz to use instead of downloading (offline builds)
#
# The patch (patches/llamacpp-0.3.36-medmoe.patch) is made against the llama.cpp that this exact
# sdist vendors (commit 0c1e570); docs/design/llamacpp-medmoe.md explains it. The built wheel is kept
# in ~/.cache/medmoe-edge/wheels/<target>-<key>/ for re-installs (REBUILD=1 forces a build). Building needs a C++17 compiler, and
# the script installs the build backend (scikit-build-core) into the interpreter; cmake >= 3.21 and
# ninja come from the system or, when missing, from PyPI wheels that scikit-build-core pulls.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST_NAME="llama_cpp_python-${VERSION}.tar.gz"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PATCH="$ROOT/patches/llamacpp-${VERSION}-medmoe.patch"
TARGET=${1:-cpu}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/medmoe-edge"

die() { echo "build_llamacpp: error: $*" >&2; exit 1; }
say() { echo "build_llamacpp: $*"; }

case "$TARGET" in
  cpu)    TARGET_ARGS="-DGGML_NATIVE=OFF" ;;
  native) TARGET_ARGS="-DGGML_NATIVE=ON" ;;
  cuda)   TARGET_ARGS="-DGGML_CUDA=on${CUDA_ARCHS:+ -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS}" ;;
  # Orin (AGX/NX/Nano) is sm_87; for Xavier (AGX/NX) use CUDA_ARCHS=72 with the cuda target.
  jetson) TARGET_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" ;;
  *)      die "unknown target '$TARGET': use cpu, native, cuda or jetson" ;;
esac

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found (set PYTHON)"
[ -f "$PATCH" ] || die "$PATCH is missing"
command -v patch >/dev/null || die "the 'patch' tool is required"

sha_ok() { echo "$SHA256  $1" | sha256sum --check --status; }

# 1. The wheel cache, keyed by the sdist, the patch, the CMake options and the Python version:
# a re-install with the same inputs takes seconds and needs no download. REBUILD=1 builds anyway.
export CMAKE_ARGS="$TARGET_ARGS -DLLAMA_BUILD_TESTS=OFF${CMAKE_ARGS:+ $CMAKE_ARGS}"
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2}
KEY=$( (echo "$SHA256"; sha256sum < "$PATCH"; echo "$CMAKE_ARGS"; "$PY" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
WHEELS="$CACHE/wheels/$TARGET-$KEY"
mkdir -p "$CACHE"

install_wheel() {
  local wheel
  wheel=$(ls "$WHEELS"/llama_cpp_python-*.whl)
  "$PY" -m pip uninstall --quiet --disable-pip-version-check -y llama-cpp-python >/dev/null 2>&1 || true
  "$PY" -m pip install --quiet --disable-pip-version-check "$wheel"
  say "installed llama-cpp-python $("$PY" -c "import llama_cpp; print(llama_cpp.__version__)") ($wheel) into $("$PY" -c 'import sys; print(sys.prefix)') (target $TARGET)"
}

if [ -z "${REBUILD:-}" ] && ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "reusing the wheel built earlier from the same sdist, patch and options"
  install_wheel
  exit 0
fi

# 2. The pinned sdist, cached and checksummed.
if [ -n "${SDIST:-}" ]; then
  cp "$SDIST" "$CACHE/$SDIST_NAME.part" && mv "$CACHE/$SDIST_NAME.part" "$CACHE/$SDIST_NAME"
fi
# The build backend, from wheels, into the interpreter: pip then needs no isolated build
# environment (which would resolve and build the backend's own dependencies every time).
if ! "$PY" -c "import scikit_build_core" >/dev/null 2>&1; then
  say "installing the build backend (scikit-build-core)"
  "$PY" -m pip install --quiet --disable-pip-version-check --only-binary :all: "scikit-build-core>=0.9.2"
fi
if [ ! -f "$CACHE/$SDIST_NAME" ] || ! sha_ok "$CACHE/$SDIST_NAME"; then
  say "downloading llama-cpp-python==$VERSION (sdist) into $CACHE"
  rm -f "$CACHE/$SDIST_NAME"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-binary llama-cpp-python -d "$CACHE" "llama-cpp-python==$VERSION"
fi
sha_ok "$CACHE/$SDIST_NAME" || die "$CACHE/$SDIST_NAME does not have the pinned sha256 $SHA256; delete it and retry"
say "sdist $CACHE/$SDIST_NAME (sha256 ok)"

# 3. Unpack and patch in a scratch directory.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/medmoe-llamacpp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$CACHE/$SDIST_NAME" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
if ! patch -p1 --dry-run --silent -d "$SRC/vendor/llama.cpp" < "$PATCH" >/dev/null 2>&1; then
  die "$(basename "$PATCH") does not apply to llama-cpp-python $VERSION (vendored llama.cpp 0c1e570); it is pinned to that exact sdist"
fi
patch -p1 --silent -d "$SRC/vendor/llama.cpp" < "$PATCH"
# A local version label, so a patched build is never mistaken for PyPI's (llama_cpp.__version__).
sed -i "s/^__version__ = \"$VERSION\"/__version__ = \"$VERSION+medmoe1\"/" "$SRC/llama_cpp/__init__.py"
say "applied $(basename "$PATCH")"

# 4. Build the wheel into the cache, then install it.
rm -rf "$WHEELS" "$WHEELS.part"
say "building ($TARGET): CMAKE_ARGS=\"$CMAKE_ARGS\", $CMAKE_BUILD_PARALLEL_LEVEL jobs; this takes minutes"
start=$(date +%s)
if ! "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$WHEELS.part" "$SRC"; then
  rm -rf "$WHEELS.part"
  die "the build failed (see the compiler output above); it needs a C++17 compiler and cmake >= 3.21"
fi
mv "$WHEELS.part" "$WHEELS"
say "built in $(( $(date +%s) - start )) s"
install_wheel
