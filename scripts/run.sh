#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job.
#   With a display ($DISPLAY or $WAYLAND_DISPLAY): napari opens with the phantom CT and
#   the PropSeg widget docked.
#   Without one (or with PROPSEG_HEADLESS=1): the same pipeline runs from the CLI into
#   outputs/ (phantom -> anchor slices -> propagation -> PNG preview); when xvfb-run is
#   available, a screenshot of napari with the widget is rendered too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$REPO"
propseg_setup
PROPSEG="$VENV/bin/propseg"

NAPARI_CODE='
import sys, napari
viewer = napari.Viewer(title="napari-propseg")
viewer.open_sample("napari-propseg", "phantom")
viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
viewer.dims.current_step = (viewer.layers[0].data.shape[0] // 2, 0, 0)
if len(sys.argv) > 1:  # headless screenshot mode
    from qtpy.QtWidgets import QApplication
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(sys.argv[1], canvas_only=False, flash=False)
    viewer.close()
else:
    napari.run()
'

if [ "${PROPSEG_HEADLESS:-0}" != "1" ] && { [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; }; then
    _log "opening napari with the phantom CT and the PropSeg widget (close the window to quit)"
    exec "$PY" -c "$NAPARI_CODE"
fi

OUT="$REPO/outputs"
mkdir -p "$OUT"
_log "no display: running the pipeline headless into $OUT"
"$PROPSEG" sample --out "$OUT" --preview

# Method: the STCN network when its weights are present, else signed-distance interpolation.
METHOD=interp
[ -f "$REPO/models/propagation/stcn_default.pt" ] && METHOD=stcn
if ls "$REPO"/models/reference/abdomen/*.pt >/dev/null 2>&1; then
    _log "reference weights found: fully automatic 'propseg segment' (method $METHOD)"
    "$PROPSEG" segment "$OUT/phantom_ct.nii.gz" --method "$METHOD" --out "$OUT/phantom_result.nii.gz" \
        --seeds "$OUT/phantom_anchors.nii.gz"
    ANCHORS=""
else
    # No reference weights yet: a simulated clinician gives the true labels on 9 evenly
    # spaced slices and the engine fills the rest.
    ANCHORS="$("$PY" -c 'import SimpleITK as s; z = s.ReadImage("'"$OUT"'/phantom_ct.nii.gz").GetSize()[2]; print(",".join(str(int((i + .5) * z / 9)) for i in range(9)))')"
    _log "no reference weights: propagating the phantom's true labels from slices $ANCHORS (method $METHOD)"
    "$PROPSEG" propagate "$OUT/phantom_ct.nii.gz" --seeds "$OUT/phantom_labels.nii.gz" --slices "$ANCHORS" \
        --method "$METHOD" --out "$OUT/phantom_result.nii.gz" --quiet
fi

"$PY" - "$OUT" "$ANCHORS" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from napari_propseg.io import read_labels, read_volume
from napari_propseg.cli.sample import write_preview

out, anchors = Path(sys.argv[1]), sys.argv[2]
ct = read_volume(out / "phantom_ct.nii.gz")
gt = read_labels(out / "phantom_labels.nii.gz", ct).array
res = read_labels(out / "phantom_result.nii.gz", ct).array
free = np.ones(gt.shape[0], bool)
if anchors:
    free[[int(z) for z in anchors.split(",")]] = False
dice = []
for i in np.unique(gt[free]):
    if i == 0:
        continue
    a, b = gt[free] == i, res[free] == i
    dice.append(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
png = write_preview(ct, read_labels(out / "phantom_result.nii.gz", ct), out / "phantom_result_preview.png")
where = f"the {int(free.sum())} non-anchor slices" if anchors else f"all {int(free.sum())} slices (fully automatic: reference + propagation)"
print(f"mean Dice over {len(dice)} labels on {where}: {np.mean(dice):.3f}")
print(f"result labels: {out / 'phantom_result.nii.gz'}")
print(f"PNG preview:   {png}")
PYEOF

if command -v xvfb-run >/dev/null 2>&1; then
    if QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" "$PY" -c "$NAPARI_CODE" "$OUT/napari_window.png" >/dev/null 2>&1; then
        echo "napari screenshot (phantom + PropSeg widget, rendered under Xvfb): $OUT/napari_window.png"
    else
        _log "napari could not render under Xvfb (run 'bash scripts/test.sh' once as root to install the Qt libraries)"
    fi
fi
echo "outputs in $OUT"
