#!/usr/bin/env bash
# Build the ONNX Runtime v1.19.2 Python wheel with the training APIs for Linux aarch64
# (Raspberry Pi 4/5 with a 64-bit OS, Jetson with JetPack 6), for CPython 3.10, 3.11 or 3.12.
# PyPI has no aarch64 onnxruntime-training-cpu wheel; fftmoe devices need one (see deploy/README.md).
#
#   deploy/build_ort_training_aarch64.sh native [--python python3.11] [--jobs N] [--out DIR]
#       on the device itself (or any aarch64 Linux with the same OS release as the device)
#   deploy/build_ort_training_aarch64.sh docker [--image python:3.11-bookworm] [--jobs N] [--out DIR]
#       on an x86_64 machine: an arm64 container under QEMU, via docker buildx (slow, see README)
#   add --dry-run to print every step without running it
#
# The wheel is named onnxruntime_training_cpu-1.19.2-cpXY-cpXY-linux_aarch64.whl, the distribution
# name fftmoe's `edge` extra asks for, so `install.sh --ort-wheel FILE` satisfies it directly.
# UNTESTED ON HARDWARE: written and checked for syntax on an x86_64 machine without aarch64
# hardware and without a Docker engine; the numbers in deploy/README.md are estimates.
set -euo pipefail

ORT_VERSION=1.19.2
ORT_REPO=https://github.com/microsoft/onnxruntime.git
CMAKE_VERSION=3.30.5      # ORT 1.19 needs CMake >= 3.26; Debian 12 ships 3.25, so take it from PyPI
NINJA_VERSION=1.11.1.1
MODE=${1:-}
[ $# -gt 0 ] && shift
PYTHON=python3
IMAGE=python:3.11-bookworm
OUT=$(pwd)/ort-wheel
WORK=$(pwd)/ort-build
JOBS=
DRY_RUN=0

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; echo "Options: --python P --image I --jobs N --out DIR --work DIR --dry-run"; }
die() { echo "build_ort_training_aarch64.sh: error: $*" >&2; exit 2; }
step() { echo "+ $*"; if [ "$DRY_RUN" = 0 ]; then "$@"; fi; }

while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYTHON=$2; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$OUT" in /*) ;; *) OUT=$(pwd)/$OUT ;; esac
case "$WORK" in /*) ;; *) WORK=$(pwd)/$WORK ;; esac

default_jobs() {
    # ~2 GB of RAM per compile job: the training kernels are heavy; more jobs than that gets OOM-killed
    local mem_gb cores
    mem_gb=$(awk '/MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo 2>/dev/null || echo 2)
    cores=$(nproc 2>/dev/null || echo 1)
    local by_mem=$(( mem_gb / 2 )); [ "$by_mem" -ge 1 ] || by_mem=1
    echo $(( cores < by_mem ? cores : by_mem ))
}

native() {
    local arch pyver
    arch=$(uname -m)
    [ "$arch" = aarch64 ] || [ "$DRY_RUN" = 1 ] || die "native builds run on aarch64 (this is $arch): use the docker mode"
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
    pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    case "$pyver" in 3.10|3.11|3.12) ;; *) die "Python $pyver: ORT 1.19.2 and fftmoe need CPython 3.10-3.12 (--python)" ;; esac
    "$PYTHON" -c 'import sysconfig, os; h = sysconfig.get_paths()["include"]; assert os.path.exists(h + "/Python.h")' \
        2>/dev/null || die "no Python.h for $PYTHON: apt-get install python$pyver-dev (or python3-dev)"
    for tool in git gcc g++ make; do command -v "$tool" >/dev/null || die "$tool missing: apt-get install build-essential git"; done
    local gcc_major; gcc_major=$(gcc -dumpversion | cut -d. -f1)
    [ "$gcc_major" -ge 11 ] || echo "warning: GCC $gcc_major; ORT 1.19.2 is built upstream with GCC 11-12 (see README)"
    JOBS=${JOBS:-$(default_jobs)}
    echo "== ORT $ORT_VERSION training wheel: Python $pyver, GCC $gcc_major, $JOBS jobs, work $WORK, out $OUT"

    step mkdir -p "$WORK" "$OUT"
    if [ ! -d "$WORK/onnxruntime/.git" ]; then
        step git clone --depth 1 --branch "v$ORT_VERSION" --recurse-submodules --shallow-submodules "$ORT_REPO" "$WORK/onnxruntime"
    fi
    step "$PYTHON" -m venv "$WORK/venv"
    step "$WORK/venv/bin/python" -m pip install --upgrade pip
    # build-time Python packages: numpy headers for the bindings (numpy 2 ABI: the result also runs with
    # numpy 1.x; built against 1.x it would not load under numpy 2), wheel/setuptools/packaging for setup.py
    step "$WORK/venv/bin/python" -m pip install "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION" "numpy>=2.0,<2.3" \
        packaging wheel "setuptools>=68"
    # --enable_training (a superset of --enable_training_apis) is what packages onnxruntime.training.api
    # in the wheel: with --enable_training_apis alone, ORT's setup.py ships only the bare
    # onnxruntime.training package (microsoft/onnxruntime#16650, #20985). The C++ side needs no torch.
    # ORT_DISABLE_PYTHON_PACKAGE_LOCAL_VERSION=1 names the wheel onnxruntime-training-cpu 1.19.2
    # (no "+cpu" local version), the distribution fftmoe[edge] requires.
    local flags=(--config Release --update --build --build_wheel --parallel "$JOBS" --skip_tests
                 --enable_training --enable_training_apis --skip_submodule_sync --compile_no_warning_as_error
                 --allow_running_as_root --cmake_generator Ninja --build_dir build/Linux
                 --cmake_extra_defines onnxruntime_BUILD_UNIT_TESTS=OFF)
    echo "+ cd $WORK/onnxruntime && ORT_DISABLE_PYTHON_PACKAGE_LOCAL_VERSION=1 PATH=$WORK/venv/bin:\$PATH ./build.sh ${flags[*]}"
    if [ "$DRY_RUN" = 0 ]; then
        (cd "$WORK/onnxruntime" && ORT_DISABLE_PYTHON_PACKAGE_LOCAL_VERSION=1 PATH="$WORK/venv/bin:$PATH" ./build.sh "${flags[@]}")
    fi
    echo "+ cp $WORK/onnxruntime/build/Linux/Release/dist/onnxruntime_training_cpu-*.whl $OUT/"
    [ "$DRY_RUN" = 1 ] || cp "$WORK"/onnxruntime/build/Linux/Release/dist/onnxruntime_training_cpu-*.whl "$OUT"/
    smoke_test
}

smoke_test() {
    # import the training API the way fftmoe's device does (without the torch-importing package __init__)
    echo "== smoke test: a fresh venv, the wheel, and onnxruntime.training.api without torch"
    step "$PYTHON" -m venv "$WORK/smoke"
    echo "+ $WORK/smoke/bin/python -m pip install $OUT/onnxruntime_training_cpu-*.whl"
    [ "$DRY_RUN" = 1 ] || "$WORK/smoke/bin/python" -m pip install "$OUT"/onnxruntime_training_cpu-*.whl
    echo "+ $WORK/smoke/bin/python -c 'shim; from onnxruntime.training import api'"
    [ "$DRY_RUN" = 1 ] || "$WORK/smoke/bin/python" - <<'EOF'
import importlib.util, sys, types
ort_dir = list(importlib.util.find_spec("onnxruntime").submodule_search_locations)[0]
shim = types.ModuleType("onnxruntime.training"); shim.__path__ = [ort_dir + "/training"]
sys.modules["onnxruntime.training"] = shim
sys.modules["onnxruntime.training.ortmodule"] = None
from onnxruntime.training import api
import onnxruntime
assert all(hasattr(api, n) for n in ("CheckpointState", "Module", "Optimizer")), dir(api)
assert "torch" not in sys.modules
print(f"OK onnxruntime {onnxruntime.__version__}: training API importable without torch")
EOF
    echo "== done: $(ls "$OUT"/onnxruntime_training_cpu-*.whl 2>/dev/null || echo "$OUT/onnxruntime_training_cpu-$ORT_VERSION-cpXY-cpXY-linux_aarch64.whl")"
    echo "   on the device: sudo sh install.sh --ort-wheel THAT_FILE   (or fftmoe bundle --ort-wheel THAT_FILE)"
}

docker_build() {
    command -v docker >/dev/null || die "docker not found"
    if [ "$DRY_RUN" = 0 ]; then
        docker buildx version >/dev/null 2>&1 || die "docker buildx missing (Debian/Ubuntu: apt-get install docker-buildx)"
        docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)"
    fi
    CTX=$(mktemp -d)
    trap 'rm -rf "$CTX"' EXIT
    local ctx=$CTX
    cp "$0" "$ctx/build.sh"
    # Debian/Ubuntu images: the same OS release as the device, so the wheel's glibc matches it
    cat > "$ctx/Dockerfile" <<EOF
FROM --platform=linux/arm64 $IMAGE AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
    build-essential git ca-certificates python3-dev python3-venv && rm -rf /var/lib/apt/lists/*
COPY build.sh /build.sh
RUN bash /build.sh native --python python3 --work /work --out /out ${JOBS:+--jobs $JOBS}
FROM scratch
COPY --from=build /out/ /
EOF
    echo "== arm64 container build of ORT $ORT_VERSION in $IMAGE under QEMU (hours: see deploy/README.md)"
    echo "+ docker run --privileged --rm tonistiigi/binfmt --install arm64   (once per host boot: QEMU for arm64)"
    [ "$DRY_RUN" = 1 ] || docker run --privileged --rm tonistiigi/binfmt --install arm64
    step docker buildx build --platform linux/arm64 --output "type=local,dest=$OUT" "$ctx"
    echo "== done: wheel in $OUT"
}

case "$MODE" in
    native) native ;;
    docker) docker_build ;;
    -h|--help|"") usage; [ -n "$MODE" ] || exit 2 ;;
    *) die "mode must be native or docker (see --help)" ;;
esac
