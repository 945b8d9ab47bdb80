"""Where the files that ship with the project live: the bundled model, its calibration set,
the FID extractor weights and reference statistics.

One module resolves them so that a moved folder is fixed in one place, and so that commands
write paths into committed files relative to the repository (`portable`), never as they lie on
the machine that ran them. Imports nothing from the rest of `tuner`.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"
DEFAULT_CKPT = STUDIES / "mnist" / "model.pth"  # the bundled default model (T = 49, 4 blocks)
DEFAULT_CALIB = STUDIES / "mnist" / "calibration.npz"  # its calibration images and labels
DEFAULT_PROFILE = STUDIES / "mnist" / "profile"  # its block profile on all of them, default settings
FID_DIR = STUDIES / "mnist" / "fid"  # mnist-cnn weights and the committed reference statistics


def portable(path: Path) -> str:
    """A path as it can be written into committed files: relative to the repository or the
    working directory when it lies below one, else just its name."""
    p = Path(path).resolve()
    for base in (REPO, Path.cwd()):
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return Path(path).name
