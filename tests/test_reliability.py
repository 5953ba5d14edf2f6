"""Issue #15 "Nothing lost, nothing confusing": every output is written atomically and
checked before the work; a full disk, a read-only or missing folder, an output that is an
input, SIGINT and SIGTERM end with one sentence, no partial or temporary file, and any
good file that was there kept as it was. Plus the CLI messages that used to mislead.

A full or read-only disk is a real tmpfs where this runs as root and ``mount`` is allowed
(the ``real`` cases; skipped elsewhere), and is simulated by patching the writer
(``simulated`` cases, run everywhere).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_propseg import atomic
from napari_propseg import io as pio
from napari_propseg.atomic import TMP_PREFIX
from napari_propseg.cli import main
from napari_propseg.errors import InputError
from napari_propseg.io import Volume, read_volume, write_labels, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
SHAPE = (24, 96, 96)  # labels as .nii: 221 KB, more than a nearly full 1 MiB tmpfs holds


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def case(tmp_path):
    """A 24-slice CT and seeds on slices 3 and 20 (two organs), in ``tmp_path/in``."""
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 120, SHAPE).astype(np.int16)
    image = Volume.from_array(hu, spacing=(2.0, 1.0, 1.0), origin=(-40.0, 10.0, 30.0))
    seeds = np.zeros(SHAPE, np.uint8)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    for z, r in ((3, 10), (20, 16)):
        seeds[z][(yy - 48) ** 2 + (xx - 40) ** 2 <= r * r] = 1
        seeds[z, 70:80, 60:75] = 2
    write_volume(hu, image, d / "ct.nii.gz")
    write_labels(seeds, image, d / "seeds.nii.gz")
    return d, image, seeds


def _propagate(d: Path, out, *extra) -> int:
    return main(["propagate", str(d / "ct.nii.gz"), "--seeds", str(d / "seeds.nii.gz"), "--out", str(out),
                 "--method", "interp", "--appearance", "0", "--quiet", *extra])


def _one_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"propseg {command}: error: "), lines
    assert "Traceback" not in err
    return lines[0]


def _debris(folder: Path) -> list[str]:
    """Temporary or partial files the writers may leave (old and new naming schemes)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith((TMP_PREFIX, ".tmp")) or ".part" in p.name or p.name.endswith(".tmp"))


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture()
def tmpfs(tmp_path):
    """``make(name, size)`` mounts a small tmpfs at ``tmp_path/name`` (skips where mount is
    not permitted); ``make.readonly(folder)`` remounts it read-only. Unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, size: str = "1m") -> Path:
        if not _can_mount():
            pytest.skip("needs root and mount for a real tmpfs (the simulated cases cover this)")
        folder = tmp_path / name
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mount not permitted here ({r.stderr.decode().strip()})")
        mounted.append(folder)
        return folder

    def readonly(folder: Path) -> None:
        r = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"remount,ro not permitted here ({r.stderr.decode().strip()})")

    make.readonly = readonly  # type: ignore[attr-defined]
    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass


def _truncating_writer(monkeypatch):
    """Simulate ITK on a full disk: the NIfTI writer stops half way and does not raise,
    and the file system reports no free space."""
    real = pio.sitk.WriteImage

    def write(image, filename, *args, **kwargs):
        real(image, filename, *args, **kwargs)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as fh:
            fh.truncate(size // 2)

    monkeypatch.setattr(pio.sitk, "WriteImage", write)
    monkeypatch.setattr(pio, "_free_bytes", lambda folder: 0, raising=False)


def _read_only(monkeypatch, folder: Path):
    """Simulate a read-only folder for a process that may be root: no write access, and
    creating a file in it fails with EROFS."""
    folder = folder.resolve()
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == folder:
            return False
        return real_access(path, mode, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _full_text_writes(monkeypatch):
    """Simulate a full disk for the atomic text/bytes writer: half the bytes go out, then ENOSPC."""

    class HalfFile:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()
            return False

    def half_open(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        return HalfFile(fh) if mode.startswith(("w", "a")) else fh

    monkeypatch.setattr(atomic, "open", half_open, raising=False)


def _no_work(monkeypatch, target: str, attr: str):
    """Make the expensive step fail the test: outputs must be checked before it."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{attr} ran before the output was checked")

    monkeypatch.setattr(f"{target}.{attr}", boom)


# --------------------------------------------------------------------------- 1. full disk


def test_full_disk_propagate_simulated_keeps_old_file(case, capsys, monkeypatch):
    d, image, seeds = case
    out = d.parent / "out"
    out.mkdir()
    write_labels(seeds, image, out / "x.nii.gz")
    before = (out / "x.nii.gz").read_bytes()
    _truncating_writer(monkeypatch)
    assert _propagate(d, out / "x.nii.gz") == 2
    captured = capsys.readouterr()
    msg = _one_line(captured.err, "propagate")
    assert "the disk is full" in msg and "x.nii.gz" in msg
    assert "wrote" not in captured.out and "replaced" not in captured.out
    assert (out / "x.nii.gz").read_bytes() == before and _debris(out) == []


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_full_disk_simulated_write_labels(tmp_path, monkeypatch, ext):
    vol = Volume.from_array(np.zeros((4, 30, 30), np.int16))
    target = tmp_path / f"l{ext}"
    write_labels(np.ones(vol.shape, np.uint8), vol, target)
    before = target.read_bytes()
    if ext == ".nrrd":  # ITK's NRRD writer raises; its message must not leak
        def write(image, filename, *args, **kwargs):
            Path(filename).write_bytes(b"NRRD0004\n")
            raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/x.cxx:1349:\n"
                               "ITK ERROR: NrrdImageIO(0x5557f88e63a0): Write: Error writing x.nrrd:\n[nrrd] nrrdSave:")

        monkeypatch.setattr(pio.sitk, "WriteImage", write)
        monkeypatch.setattr(pio, "_free_bytes", lambda folder: 0, raising=False)
    else:
        _truncating_writer(monkeypatch)
    with pytest.raises(InputError) as exc:
        write_labels(np.full(vol.shape, 2, np.uint8), vol, target)
    msg = str(exc.value)
    assert "the disk is full" in msg and "\n" not in msg and "0x" not in msg and "ITK" not in msg
    assert target.read_bytes() == before and _debris(tmp_path) == []


@pytest.mark.parametrize("fill", ["nearly", "completely"])
def test_full_disk_real_propagate(case, capsys, tmpfs, fill):
    d, image, seeds = case
    full = tmpfs("full")
    write_labels(seeds, image, full / "x.nii")  # a good earlier result, 221 KB
    before = (full / "x.nii").read_bytes()
    _fill(full, leave=128 * 1024 if fill == "nearly" else 0)
    assert _propagate(d, full / "x.nii") == 2
    captured = capsys.readouterr()
    msg = _one_line(captured.err, "propagate")
    assert "full" in msg and "x.nii" in msg and "wrote" not in captured.out
    assert (full / "x.nii").read_bytes() == before and _debris(full) == []


def test_napari_writer_reports_a_full_disk(tmp_path, monkeypatch):
    from napari_propseg import _writer
    from napari_propseg.session import META_KEY, geometry_of

    vol = Volume.from_array(np.zeros((4, 30, 30), np.int16))
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:3, 5:9, 5:9] = 3
    target = tmp_path / "drawn.nii.gz"
    write_labels(np.ones(vol.shape, np.uint8), vol, target)
    before = target.read_bytes()
    errors: list[str] = []
    monkeypatch.setattr(_writer, "_notify_error", errors.append)
    _truncating_writer(monkeypatch)
    meta = {"name": "drawn", "metadata": {META_KEY: geometry_of(vol)}}
    assert _writer.write_labels(str(target), lab, meta) == []
    assert len(errors) == 1 and "the disk is full" in errors[0]
    assert target.read_bytes() == before and _debris(tmp_path) == []


# --------------------------------------------------------------------------- 2. read-only folder


def _ro_folder(kind: str, base: Path, monkeypatch, tmpfs, files: dict[str, bytes]) -> Path:
    if kind == "real":
        folder = tmpfs("ro")
        for name, data in files.items():
            (folder / name).write_bytes(data)
        tmpfs.readonly(folder)
    else:
        folder = base / "ro"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        _read_only(monkeypatch, folder)
    return folder


@pytest.mark.parametrize("kind", ["simulated", "real"])
def test_read_only_folder_propagate(case, capsys, monkeypatch, tmpfs, kind):
    d, image, seeds = case
    good = (d / "seeds.nii.gz").read_bytes()
    ro = _ro_folder(kind, d.parent, monkeypatch, tmpfs, {"x.nii.gz": good})
    _no_work(monkeypatch, "napari_propseg.cli.propagate", "PropagationEngine")
    assert _propagate(d, ro / "x.nii.gz") == 2
    msg = _one_line(capsys.readouterr().err, "propagate")
    assert "x.nii.gz" in msg and ("read-only" in msg or "not writable" in msg)
    assert (ro / "x.nii.gz").read_bytes() == good and _debris(ro) == []


@pytest.mark.parametrize("kind", ["simulated", "real"])
def test_read_only_folder_evaluate(case, capsys, monkeypatch, tmpfs, kind):
    d, image, seeds = case
    ro = _ro_folder(kind, d.parent, monkeypatch, tmpfs, {"r.csv": b"old report\n"})
    rc = main(["evaluate", str(d / "seeds.nii.gz"), str(d / "seeds.nii.gz"), "--out", str(ro / "r.csv")])
    assert rc == 2
    msg = _one_line(capsys.readouterr().err, "evaluate")
    assert "r.csv" in msg
    assert (ro / "r.csv").read_bytes() == b"old report\n" and _debris(ro) == []


@pytest.mark.parametrize("kind", ["simulated", "real"])
def test_read_only_folder_suggest_fails_before_the_networks(case, capsys, monkeypatch, tmpfs, kind):
    d, _, _ = case
    ro = _ro_folder(kind, d.parent, monkeypatch, tmpfs, {})
    _no_work(monkeypatch, "napari_propseg.reference.inference", "suggest_slices")
    assert main(["suggest", str(d / "ct.nii.gz"), "--out", str(ro / "s.nii.gz")]) == 2
    msg = _one_line(capsys.readouterr().err, "suggest")
    assert "s.nii.gz" in msg and _debris(ro) == []


def test_read_only_folder_sample(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    _no_work(monkeypatch, "napari_propseg.cli.sample", "make_phantom")
    assert main(["sample", "--out", str(ro / "phantom")]) == 2
    msg = _one_line(capsys.readouterr().err, "sample")
    assert "phantom" in msg and list(ro.iterdir()) == []


# --------------------------------------------------------------------------- 3. other write failures


def test_full_disk_evaluate_simulated(case, capsys, monkeypatch):
    d, _, _ = case
    out = d.parent / "out"
    out.mkdir()
    (out / "r.csv").write_text("old report\n")
    _full_text_writes(monkeypatch)
    rc = main(["evaluate", str(d / "seeds.nii.gz"), str(d / "seeds.nii.gz"), "--out", str(out / "r.csv")])
    assert rc == 2
    assert "the disk is full" in _one_line(capsys.readouterr().err, "evaluate")
    assert (out / "r.csv").read_text() == "old report\n" and _debris(out) == []


def test_full_disk_real_evaluate(case, capsys, tmpfs):
    d, _, _ = case
    full = tmpfs("full")
    (full / "r.csv").write_text("old report\n")
    _fill(full)
    rc = main(["evaluate", str(d / "seeds.nii.gz"), str(d / "seeds.nii.gz"), "--out", str(full / "r.csv")])
    assert rc == 2
    assert "full" in _one_line(capsys.readouterr().err, "evaluate")
    assert (full / "r.csv").read_text() == "old report\n" and _debris(full) == []


def test_full_disk_suggest_json_leaves_nothing(case, tmp_path, monkeypatch):
    """The slices JSON of suggest / segment goes through the atomic writer too."""
    from napari_propseg.cli.suggest import slices_json_path, write_suggestion

    d, image, seeds = case
    out = tmp_path / "sug"
    out.mkdir()

    class Sug:
        labels, slices, sampled, per_organ_best, seconds, label_map, dropped = seeds, [3, 20], [3, 20], {}, 0.1, {}, {}

    write_suggestion(Sug, image, out / "s.nii.gz", None)
    before = slices_json_path(out / "s.nii.gz").read_bytes()
    _full_text_writes(monkeypatch)
    with pytest.raises(InputError, match="the disk is full"):
        write_suggestion(Sug, image, out / "s.nii.gz", None)
    assert slices_json_path(out / "s.nii.gz").read_bytes() == before and _debris(out) == []


def test_sample_full_disk_leaves_no_half_written_ct(tmp_path, capsys, monkeypatch):
    out = tmp_path / "phantom"
    _truncating_writer(monkeypatch)
    assert main(["sample", "--out", str(out), "--shape", "8", "48", "48"]) == 2
    assert "the disk is full" in _one_line(capsys.readouterr().err, "sample")
    assert not out.exists()  # nothing could be written: the folder it made is gone too


def test_label_map_full_disk_and_read_only(tmp_path, monkeypatch):
    from napari_propseg.labelmap import read_label_map, write_label_map

    target = write_label_map({1: "liver"}, tmp_path / "labels.json")
    _full_text_writes(monkeypatch)
    with pytest.raises(InputError, match="the disk is full"):
        write_label_map({1: "spleen"}, target)
    monkeypatch.undo()
    assert read_label_map(target) == {1: "liver"} and _debris(tmp_path) == []
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(InputError, match="labels.json"):
        write_label_map({1: "spleen"}, target)
    monkeypatch.undo()
    assert read_label_map(target) == {1: "liver"} and _debris(tmp_path) == []


def _torch_full_disk(monkeypatch):
    """torch.save on a full disk: part of the archive, then a RuntimeError; no free space."""
    import torch

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half an archive")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0))


def test_weights_and_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from napari_propseg.training.common import load_checkpoint, save_checkpoint
    from napari_propseg.weights import load_weights, save_weights

    net = torch.nn.Linear(3, 2)
    w = save_weights(tmp_path / "w.pt", "test", {"a": 1}, net.state_dict())
    c = save_checkpoint(tmp_path / "c.pt", model=net, optimizer=None, scheduler=None, step=5, config={})
    _torch_full_disk(monkeypatch)
    with pytest.raises(InputError, match="the disk is full"):
        save_weights(w, "test", {"a": 2}, net.state_dict())
    with pytest.raises(InputError, match="the disk is full"):
        save_checkpoint(c, model=net, optimizer=None, scheduler=None, step=9, config={})
    monkeypatch.undo()
    assert load_weights(w, "test")[0] == {"a": 1}
    assert load_checkpoint(c, model=net, restore_rng=False)["step"] == 5
    assert _debris(tmp_path) == []


def test_weights_on_a_real_full_disk(tmpfs):
    import torch

    from napari_propseg.weights import load_weights, save_weights

    full = tmpfs("full")
    w = save_weights(full / "w.pt", "test", {"a": 1}, torch.nn.Linear(3, 2).state_dict())
    _fill(full)
    with pytest.raises(InputError, match="the disk is full"):
        save_weights(w, "test", {"a": 2}, torch.nn.Linear(300, 200).state_dict())
    assert load_weights(w, "test")[0] == {"a": 1} and _debris(full) == []


def test_training_log_never_ends_in_half_a_row(tmp_path, monkeypatch):
    from napari_propseg.training import common

    logger = common.CSVLogger(tmp_path / "log.csv", ["step", "loss"])
    logger.log({"step": 1, "loss": 0.5})
    before = (tmp_path / "log.csv").read_bytes()
    real_open = open

    class HalfAppend:
        def __init__(self, path, mode="r", *args, **kwargs):
            self._fh = real_open(path, mode, *args, **kwargs)

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()
            return False

    monkeypatch.setattr(common, "open", HalfAppend, raising=False)
    with pytest.raises(InputError, match="the disk is full"):
        logger.log({"step": 2, "loss": 0.25})
    monkeypatch.undo()
    assert (tmp_path / "log.csv").read_bytes() == before and _debris(tmp_path) == []


_SIGNAL_DRIVER = textwrap.dedent('''
    import os, signal, sys, time
    import napari_propseg.io as pio
    from napari_propseg.cli import main

    real = pio.sitk.WriteImage
    sig = getattr(signal, sys.argv[1])

    def interrupted_write(image, filename, *args, **kwargs):
        real(image, filename, *args, **kwargs)
        with open(filename, "r+b") as fh:  # the signal arrives half way through the file
            fh.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), sig)
        time.sleep(30)

    pio.sitk.WriteImage = interrupted_write
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    sys.exit(main(sys.argv[2:]))
''')


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_during_the_write(case, tmp_path, sig, code):
    d, image, seeds = case
    out = tmp_path / "out"
    out.mkdir()
    write_labels(seeds, image, out / "x.nii.gz")
    before = (out / "x.nii.gz").read_bytes()
    driver = tmp_path / "driver.py"
    driver.write_text(_SIGNAL_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PROPSEG_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(driver), sig, "propagate", str(d / "ct.nii.gz"), "--seeds", str(d / "seeds.nii.gz"),
         "--out", str(out / "x.nii.gz"), "--method", "interp", "--appearance", "0", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    assert "wrote" not in proc.stdout and "Traceback" not in proc.stderr
    assert ("terminated" if sig == "SIGTERM" else "cancelled") in proc.stderr
    assert (out / "x.nii.gz").read_bytes() == before and _debris(out) == []


def test_stale_temporaries_of_a_killed_writer_are_removed(case, capsys):
    d, _, _ = case
    out = d.parent / "out"
    out.mkdir()
    old = out / f"{TMP_PREFIX}abc.nii.gz"  # left by a kill -9 long ago
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = out / f"{TMP_PREFIX}def.nii.gz"  # another process writing right now
    fresh.write_bytes(b"x")
    assert _propagate(d, out / "x.nii.gz") == 0
    assert not old.exists() and fresh.exists()


# --------------------------------------------------------------------------- 4. outputs checked first


@pytest.mark.parametrize("command", ["propagate", "suggest", "segment", "evaluate", "pseudo-label"])
def test_missing_output_folder_fails_before_the_work(case, capsys, monkeypatch, command):
    d, _, _ = case
    missing = d.parent / "no_such_folder"
    _no_work(monkeypatch, "napari_propseg.cli.propagate", "PropagationEngine")
    _no_work(monkeypatch, "napari_propseg.reference.inference", "suggest_slices")
    _no_work(monkeypatch, "napari_propseg.cli.segment", "segment")
    _no_work(monkeypatch, "napari_propseg.training.pseudo_label", "pseudo_label_folder")
    ct, seeds = str(d / "ct.nii.gz"), str(d / "seeds.nii.gz")
    argv = {
        "propagate": ["propagate", ct, "--seeds", seeds, "--out", str(missing / "x.nii.gz")],
        "suggest": ["suggest", ct, "--out", str(missing / "x.nii.gz")],
        "segment": ["segment", ct, "--out", str(missing / "x.nii.gz")],
        "evaluate": ["evaluate", seeds, seeds, "--out", str(missing / "r.csv")],
        # pseudo-label creates --out, but not under a file
        "pseudo-label": ["pseudo-label", str(d), "--models", seeds, seeds, "--out", str(Path(seeds) / "sub")],
    }[command]
    assert main(argv) == 2
    msg = _one_line(capsys.readouterr().err, command)
    assert "no_such_folder" in msg or "not a folder" in msg
    assert not missing.exists()


def test_segment_checks_its_seeds_output_too(case, capsys, monkeypatch):
    d, _, _ = case
    _no_work(monkeypatch, "napari_propseg.cli.segment", "segment")
    assert main(["segment", str(d / "ct.nii.gz"), "--out", str(d.parent / "x.nii.gz"),
                 "--seeds", str(d.parent / "nowhere" / "s.nii.gz")]) == 2
    assert "nowhere" in _one_line(capsys.readouterr().err, "segment")


def test_unsupported_output_extension_fails_before_the_work(case, capsys, monkeypatch):
    d, _, _ = case
    _no_work(monkeypatch, "napari_propseg.cli.propagate", "PropagationEngine")
    assert _propagate(d, d.parent / "x.png") == 2
    assert "unsupported file type" in _one_line(capsys.readouterr().err, "propagate")


# --------------------------------------------------------------------------- 5. overwriting


def test_out_equal_to_seeds_is_refused(case, capsys, monkeypatch):
    d, _, _ = case
    before = (d / "seeds.nii.gz").read_bytes()
    _no_work(monkeypatch, "napari_propseg.cli.propagate", "PropagationEngine")
    assert _propagate(d, d / "seeds.nii.gz") == 2
    assert "also an input" in _one_line(capsys.readouterr().err, "propagate")
    assert (d / "seeds.nii.gz").read_bytes() == before
    # the same file under another name, too
    os.symlink(d / "seeds.nii.gz", d / "alias.nii.gz")
    assert _propagate(d, d / "alias.nii.gz") == 2
    assert "also an input" in _one_line(capsys.readouterr().err, "propagate")
    assert (d / "seeds.nii.gz").read_bytes() == before


def test_replacing_an_existing_output_is_said(case, capsys):
    d, _, _ = case
    out = d.parent / "x.nii.gz"
    assert _propagate(d, out) == 0
    assert "replaced existing" not in capsys.readouterr().out
    assert _propagate(d, out) == 0
    assert f"replaced existing {out}" in capsys.readouterr().out


# --------------------------------------------------------------------------- 6. messages


def test_filled_count_names_the_empty_slices(case, capsys):
    d, _, _ = case
    assert _propagate(d, d.parent / "x.nii.gz") == 0
    out = capsys.readouterr().out
    assert "16 slices filled from 2 anchor(s)" in out  # slices 4..19, not the 22 computed
    assert "slices 0-2 and 21-23 lie outside the outermost anchors and were left empty" in out


def test_one_labelled_slice_is_refused_for_interp(case, capsys):
    d, image, seeds = case
    one = seeds.copy()
    one[20] = 0
    write_labels(one, image, d / "seeds.nii.gz")
    assert _propagate(d, d.parent / "x.nii.gz") == 2
    msg = _one_line(capsys.readouterr().err, "propagate")
    assert "at least two slices" in msg and "slice 3" in msg
    assert not (d.parent / "x.nii.gz").exists()
    # an empty anchor slice bounds the organ: that propagates
    assert _propagate(d, d.parent / "x.nii.gz", "--slices", "3,12") == 0
    assert "from 2 anchor(s)" in capsys.readouterr().out


def test_duplicate_slices_are_merged(case, capsys, caplog):
    d, _, _ = case
    with caplog.at_level(logging.WARNING):
        assert _propagate(d, d.parent / "x.nii.gz", "--slices", "3,3,20") == 0
    assert "from 2 anchor(s)" in capsys.readouterr().out
    assert any("more than once" in r.getMessage() for r in caplog.records)


def test_resampled_seeds_are_announced_once(case, capsys, caplog):
    d, image, seeds = case
    # the seeds on a finer grid covering the same space: resampled, with one notice
    fine = Volume.from_array(np.repeat(seeds, 2, axis=0), spacing=(1.0, 1.0, 1.0), origin=(-40.0, 10.0, 29.5))
    write_labels(fine.array, fine, d / "seeds.nii.gz")
    with caplog.at_level(logging.WARNING):
        assert _propagate(d, d.parent / "x.nii.gz") == 0
    notices = [r for r in caplog.records if "resampled onto the image grid" in r.getMessage()]
    assert len(notices) == 1


def test_geometry_error_names_what_differs(case, capsys):
    d, image, seeds = case
    far = Volume.from_array(seeds, spacing=(2.0, 1.0, 1.0), origin=(400.0, 400.0, 400.0))
    write_labels(seeds, far, d / "seeds.nii.gz")
    assert _propagate(d, d.parent / "x.nii.gz") == 2
    msg = _one_line(capsys.readouterr().err, "propagate")
    assert "origin (400, 400, 400) mm vs the image's (-40, 10, 30) mm" in msg
    assert "shape" not in msg  # the shapes are the same


def test_png_renamed_nii_gz_is_not_called_truncated(tmp_path):
    fake = tmp_path / "scan.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.uint8)), str(tmp_path / "p.png"))
    fake.write_bytes((tmp_path / "p.png").read_bytes())
    with pytest.raises(InputError) as exc:
        read_volume(fake)
    msg = str(exc.value)
    assert "is not a NIfTI file (it is a PNG image)" in msg and "truncated" not in msg
    # a real NIfTI cut short is still called truncated
    good = tmp_path / "good.nii.gz"
    write_volume(np.random.default_rng(0).normal(size=(8, 20, 20)).astype(np.float32),
                 Volume.from_array(np.zeros((8, 20, 20))), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)


def test_no_raw_itk_text_for_a_folder_without_dicom(tmp_path, capfd):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    assert main(["info", str(tmp_path / "notes")]) == 2
    err = capfd.readouterr().err
    assert "GDCMSeriesFileNames" not in err and "WARNING: In" not in err
    _one_line(err, "info")


def test_gt_label_map_with_metadata_and_a_key(tmp_path):
    from napari_propseg.labelmap import read_label_map

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"name": "TotalSegmentator", "version": "2.0", "labels": {"1": "spleen", "5": "liver"}}))
    assert read_label_map(path, key="labels") == {1: "spleen", 5: "liver"}
    assert read_label_map(path) == {1: "spleen", 5: "liver"}  # the only map in it
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"1": "liver", "version": 2, "colors": [[1, 2, 3]]}))
    assert read_label_map(flat) == {1: "liver"}


def test_evaluate_with_gt_labels_key_and_empty_ground_truth_warns(case, tmp_path, capsys, caplog):
    d, image, seeds = case
    gt_map = tmp_path / "gt.json"
    gt_map.write_text(json.dumps({"description": "ground truth ids", "labels": {"1": "liver", "2": "spleen"}}))
    write_labels(np.zeros_like(seeds), image, tmp_path / "gt.nii.gz")
    with caplog.at_level(logging.WARNING):
        rc = main(["evaluate", str(d / "seeds.nii.gz"), str(tmp_path / "gt.nii.gz"), "--gt-labels", str(gt_map),
                   "--gt-labels-key", "labels", "--out", str(tmp_path / "r.csv")])
    assert rc == 0, capsys.readouterr().err
    assert any("ground truth" in r.getMessage() and "holds no label" in r.getMessage() for r in caplog.records)


def test_all_empty_labels_written_with_a_warning(tmp_path, caplog, monkeypatch):
    from napari_propseg import _writer
    from napari_propseg.session import META_KEY, geometry_of

    vol = Volume.from_array(np.zeros((4, 30, 30), np.int16))
    with caplog.at_level(logging.WARNING):
        write_labels(np.zeros(vol.shape, np.uint8), vol, tmp_path / "empty.nii.gz")
    assert any("holds no label" in r.getMessage() for r in caplog.records)
    warnings: list[str] = []
    monkeypatch.setattr(_writer, "_notify_warning", warnings.append, raising=False)
    meta = {"name": "l", "metadata": {META_KEY: geometry_of(vol)}}
    assert _writer.write_labels(str(tmp_path / "drawn.nii.gz"), np.zeros(vol.shape, np.uint8), meta) != []
    assert len(warnings) == 1 and "holds no label" in warnings[0]


def test_info_on_a_label_file_lists_ids_not_hu(case, capsys):
    d, _, _ = case
    assert main(["info", str(d / "seeds.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "label ids:   0, 1, 2 present" in out and "HU range" not in out
    assert main(["info", str(d / "ct.nii.gz")]) == 0
    assert "HU range" in capsys.readouterr().out
    assert main(["info", "--json", str(d / "seeds.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["label_ids"] == [0, 1, 2]


def test_pseudo_label_names_models_for_a_missing_file(case, capsys):
    d, _, _ = case
    rc = main(["pseudo-label", str(d), "--models", str(d / "a.pt"), str(d / "b.pt"), "--out", str(d.parent / "pl")])
    assert rc == 2
    msg = _one_line(capsys.readouterr().err, "pseudo-label")
    assert "--models" in msg and "--weights" not in msg and "a.pt" in msg
