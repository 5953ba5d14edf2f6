# shellcheck shell=bash
# Shared set-up for scripts/run.sh and scripts/test.sh (sourced, not run).
#
# Creates .venv in the repository if missing, installs torch==2.13.0 first (a local CPU
# wheel when one is at hand, else the CPU index, so nothing pulls CUDA), then the package
# in editable mode with the PyQt6 and dev extras. A stamp file holding the hash of
# pyproject.toml (and the Python version) makes a second run skip pip entirely.
#
# Environment:
#   PROPSEG_VENV         virtualenv folder (default: <repo>/.venv)
#   PROPSEG_WHEELS       folder searched for a torch-2.13.0 wheel (default: /opt/wheels)
#   PROPSEG_FORCE_PIP=1  reinstall even if the stamp is current

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PROPSEG_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.propseg-install-stamp"

_log() { echo "[propseg] $*" >&2; }

# pip, minus the warnings about index folders that do not exist on this machine.
_pip() {
    "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

_want_stamp() {
    { sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1; "$PY" -c 'import sys; print(sys.version)'; echo "$REPO"; } \
        | sha256sum | cut -d' ' -f1
}

_install_torch() {
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
        return 0
    fi
    local wheel=""
    for d in "${PROPSEG_WHEELS:-/opt/wheels}" "$REPO/.whl"; do
        [ -d "$d" ] || continue
        wheel="$(ls "$d"/torch-"$TORCH_VERSION"*cpu*.whl 2>/dev/null | head -1 || true)"
        [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        _log "installing torch from the local wheel $wheel"
        _pip install --quiet "$wheel"
    else
        _log "installing torch==$TORCH_VERSION (CPU build) from download.pytorch.org"
        _pip install --quiet "torch==$TORCH_VERSION" \
            --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
}

propseg_setup() {
    if [ ! -x "$PY" ]; then
        _log "creating $VENV"
        python3 -m venv "$VENV" || { _log "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; return 2; }
    fi
    local want
    want="$(_want_stamp)"
    if [ "${PROPSEG_FORCE_PIP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
        && "$PY" -c "import napari_propseg" 2>/dev/null; then
        _log "environment up to date ($VENV)"
        return 0
    fi
    _log "installing napari-propseg and its dependencies into $VENV (first run: a few minutes)"
    _install_torch || return 2
    _pip install --quiet -e "$REPO[pyqt6,dev]" || return 2
    "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" \
        || { _log "torch is not $TORCH_VERSION after the install; refusing to continue"; return 2; }
    echo "$want" > "$STAMP"
    _log "environment ready"
}

# Debian packages Qt's xcb platform plugin and xvfb-run need on a bare system.
GUI_PACKAGES=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-randr0
              libxcb-shape0 libxcb-xkb1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1
              libdbus-1-3 libglib2.0-0)

missing_gui_packages() {
    local p missing=()
    for p in "${GUI_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    echo "${missing[*]}"
}

# Install missing GUI packages when root; otherwise print the command and return 2.
ensure_gui_packages() {
    command -v dpkg-query >/dev/null || { command -v xvfb-run >/dev/null && return 0; _log "xvfb-run not found; install Xvfb"; return 2; }
    local missing
    missing="$(missing_gui_packages)"
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != "0" ]; then
        _log "missing Debian packages for the GUI tests; run as root:"
        echo "sudo apt-get update && sudo apt-get install -y --no-install-recommends $missing" >&2
        return 2
    fi
    _log "installing Debian packages: $missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null || return 2
    fi
}
