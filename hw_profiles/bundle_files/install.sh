#!/bin/sh
# Install an fftmoe device bundle (made by `fftmoe bundle`): a virtual environment with only the
# `edge` extra (never torch), this bundle's artifacts, device.toml and credentials, and, unless
# --no-systemd, a dedicated `fftmoe` user and the fftmoe-device systemd service.
#
#   sudo sh install.sh                          # x86_64: ORT training wheel from PyPI
#   sudo sh install.sh --ort-wheel onnxruntime_training_cpu-1.19.2-cp311-cp311-linux_aarch64.whl
#   sudo sh install.sh --index-url https://wheels.example/simple
#   sh install.sh --no-systemd --prefix "$HOME/fftmoe"   # no system change; prints the run command
#   sh install.sh --dry-run                     # print every step, do nothing
#
# Layout: PREFIX (default /opt/fftmoe) holds venv/ and device/ (device.toml, artifacts/, credentials/,
# data/). Paths in device.toml are relative to PREFIX/device, the service's working directory.
# With systemd, PREFIX/device/state links to /var/lib/fftmoe (the unit's StateDirectory).
# Exit codes: 0 installed (or dry run done); 1 a step failed; 2 bad usage or unsupported system.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/fftmoe
PYTHON=python3
ORT_WHEEL=
INDEX_URL=
DEVICE_ID=
SYSTEMD=1
DRY_RUN=0
ORT_REQ="onnxruntime-training-cpu==1.19.2"
SERVICE=fftmoe-device.service
STATE=/var/lib/fftmoe

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    echo "Options: --prefix DIR  --python PYTHON  --ort-wheel FILE  --index-url URL  --device-id ID"
    echo "         --no-systemd  --dry-run  -h|--help"
}

die() { echo "install.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --ort-wheel) [ $# -ge 2 ] || die "--ort-wheel needs a file"; ORT_WHEEL=$2; shift 2 ;;
        --index-url) [ $# -ge 2 ] || die "--index-url needs a URL"; INDEX_URL=$2; shift 2 ;;
        --device-id) [ $# -ge 2 ] || die "--device-id needs an id"; DEVICE_ID=$2; shift 2 ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
VENV=$PREFIX/venv
DEVICE=$PREFIX/device

# step CMD...: print a step, run it unless --dry-run.
step() {
    echo "+ $*"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
note() { echo "== $*"; }

# --- checks (read-only, also in a dry run) -------------------------------------------------------
[ -f "$HERE/device.toml" ] && [ -d "$HERE/artifacts" ] || die "run install.sh from an unpacked bundle ($HERE has no device.toml/artifacts)"
FFTMOE_WHEEL=$(ls "$HERE"/wheels/fftmoe-*.whl 2>/dev/null | head -n 1 || true)
[ -n "$FFTMOE_WHEEL" ] || die "no wheels/fftmoe-*.whl in the bundle"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.10-3.12 or pass --python"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$PYVER" in
    3.10|3.11|3.12) ;;
    *) die "Python $PYVER: the ONNX Runtime training wheel needs CPython 3.10-3.12 (pass --python python3.11)" ;;
esac
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON cannot create virtual environments: apt-get install python3-venv"
ARCH=$(uname -m)
if [ -z "$ORT_WHEEL" ] && [ -z "$INDEX_URL" ]; then
    ORT_WHEEL=$(ls "$HERE"/wheels/onnxruntime*.whl 2>/dev/null | head -n 1 || true)
fi
if [ -n "$ORT_WHEEL" ]; then
    case "$ORT_WHEEL" in /*) ;; *) ORT_WHEEL=$(pwd)/$ORT_WHEEL ;; esac
    [ -f "$ORT_WHEEL" ] || die "--ort-wheel $ORT_WHEEL: no such file"
    ORT_SOURCE="wheel $ORT_WHEEL"
elif [ -n "$INDEX_URL" ]; then
    ORT_SOURCE="$ORT_REQ from the extra index $INDEX_URL"
elif [ "$ARCH" = x86_64 ]; then
    ORT_SOURCE="$ORT_REQ from PyPI"
else
    die "no ONNX Runtime training wheel for $ARCH on PyPI: build one with deploy/build_ort_training_aarch64.sh and pass --ort-wheel FILE (or --index-url URL)"
fi
if [ "$SYSTEMD" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "installing the service needs root (sudo sh install.sh), or use --no-systemd"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: use --no-systemd and start the device yourself"
fi
if [ -z "$DEVICE_ID" ]; then
    # a valid device id from the host name: [A-Za-z0-9_.-]{1,64}
    DEVICE_ID=$(hostname 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)
    [ -n "$DEVICE_ID" ] || DEVICE_ID=fftmoe-device
fi
note "bundle $HERE -> $PREFIX (Python $PYVER, $ARCH, ORT: $ORT_SOURCE, systemd: $([ "$SYSTEMD" = 1 ] && echo yes || echo no))"

# --- steps -----------------------------------------------------------------------------------------
pip_install() { step "$VENV/bin/python" -m pip install --disable-pip-version-check "$@"; }

note "1. virtual environment"
step mkdir -p "$PREFIX"
step "$PYTHON" -m venv "$VENV"

note "2. ONNX Runtime training wheel ($ORT_SOURCE)"
if [ -n "$ORT_WHEEL" ]; then
    pip_install "$ORT_WHEEL"
elif [ -n "$INDEX_URL" ]; then
    pip_install --extra-index-url "$INDEX_URL" "$ORT_REQ"
else
    pip_install "$ORT_REQ"
fi

note "3. fftmoe with only the edge extra"
HAS_ORT_CPU=1
if [ "$DRY_RUN" = 0 ]; then
    "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("onnxruntime-training-cpu")' 2>/dev/null || HAS_ORT_CPU=0
fi
if [ "$HAS_ORT_CPU" = 1 ]; then
    pip_install "$FFTMOE_WHEEL[edge]"
else
    # a wheel built under another distribution name (onnxruntime-training): keep it, install the rest of
    # the edge extra by hand so pip does not look for onnxruntime-training-cpu
    echo "note: the ORT wheel is not named onnxruntime-training-cpu; installing the edge extra without it"
    pip_install --no-deps "$FFTMOE_WHEEL"
    pip_install -r "$HERE/wheels/edge-requirements.txt"
fi

note "4. device files in $DEVICE"
step mkdir -p "$DEVICE/data"
if [ -d "$DEVICE/artifacts" ]; then step rm -rf "$DEVICE/artifacts"; fi
step cp -R "$HERE/artifacts" "$DEVICE/artifacts"
if [ -f "$DEVICE/device.toml" ]; then step cp "$DEVICE/device.toml" "$DEVICE/device.toml.bak"; fi
step cp "$HERE/device.toml" "$DEVICE/device.toml"
if ! grep -q '^device_id *=' "$HERE/device.toml"; then
    echo "+ append device_id = \"$DEVICE_ID\" to $DEVICE/device.toml"
    [ "$DRY_RUN" = 1 ] || printf 'device_id = "%s"\n' "$DEVICE_ID" >> "$DEVICE/device.toml"
fi
step cp "$HERE/README.txt" "$DEVICE/README.txt"
if [ -d "$HERE/credentials" ]; then
    step rm -rf "$DEVICE/credentials"
    step cp -R "$HERE/credentials" "$DEVICE/credentials"
    step chmod 0700 "$DEVICE/credentials"
    step find "$DEVICE/credentials" -type f -exec chmod 0600 {} +
fi

if [ "$SYSTEMD" = 0 ]; then
    step mkdir -p "$DEVICE/state"
    note "5. check the installation"
    echo "+ (cd $DEVICE && $VENV/bin/fftmoe device doctor --config device.toml)"
    if [ "$DRY_RUN" = 0 ]; then
        (cd "$DEVICE" && "$VENV/bin/fftmoe" device doctor --config device.toml) \
            || echo "install.sh: doctor found problems (above); fix them before starting the device"
    fi
    note "installed without systemd. Start the device with:"
    echo "  cd $DEVICE && $VENV/bin/fftmoe device run --config device.toml"
    exit 0
fi

note "5. service user and state directory $STATE"
if ! id fftmoe >/dev/null 2>&1; then
    step useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin fftmoe
fi
if [ -e "$DEVICE/state" ] || [ -L "$DEVICE/state" ]; then step rm -rf "$DEVICE/state"; fi
# root owns everything the service reads and the fftmoe group may read it; only the state is writable
step chown -R root:fftmoe "$DEVICE"
step chmod -R g+rX,g-w,o-rwx "$DEVICE"
if [ -d "$HERE/credentials" ]; then
    step chmod 0750 "$DEVICE/credentials"
    step find "$DEVICE/credentials" -type f -exec chmod 0640 {} +
fi
step ln -s "$STATE" "$DEVICE/state"

note "6. systemd unit /etc/systemd/system/$SERVICE"
echo "+ sed 's#/opt/fftmoe#$PREFIX#g' $HERE/$SERVICE > /etc/systemd/system/$SERVICE"
[ "$DRY_RUN" = 1 ] || sed "s#/opt/fftmoe#$PREFIX#g" "$HERE/$SERVICE" > "/etc/systemd/system/$SERVICE"
step chmod 0644 "/etc/systemd/system/$SERVICE"
step systemctl daemon-reload

note "7. check the installation, then start the service"
echo "+ (cd $DEVICE && runuser -u fftmoe -- $VENV/bin/fftmoe device doctor --config device.toml)"
if [ "$DRY_RUN" = 0 ]; then
    (cd "$DEVICE" && runuser -u fftmoe -- "$VENV/bin/fftmoe" device doctor --config device.toml) \
        || echo "install.sh: doctor found problems (above); fix them, then: systemctl restart $SERVICE"
fi
step systemctl enable --now "$SERVICE"
note "installed. Follow the device with: journalctl -u $SERVICE -f"
