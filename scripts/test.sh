#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite, GUI tests included, under Xvfb.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k widget -x).
# Exit code: pytest's (2 when the set-up itself cannot be done).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO" || exit 2
propseg_setup || exit 2
ensure_gui_packages || exit 2
export QT_QPA_PLATFORM=xcb
export PYTHONUNBUFFERED=1
unset DISPLAY WAYLAND_DISPLAY
start=$(date +%s)
xvfb-run -a -s "-screen 0 1600x1000x24 -nolisten tcp" "$PY" -m pytest -p no:cacheprovider "$@"
rc=$?
_log "pytest exit code $rc after $(( $(date +%s) - start )) s"
exit $rc
