#!/usr/bin/env bash
# Download the wheels the air-gapped GPU box lacks (optuna, plotly and their dependencies that
# the box does not have) into .whl/ for CPython 3.12 manylinux x86-64. Run where PyPI is
# reachable; run.sh installs them on the box with pip --no-index --no-deps.
# Versions are those the project's tests ran with. greenlet is left out: SQLAlchemy 2.1 needs it
# only for asyncio. typing_extensions comes because alembic wants >= 4.12 (torch asks less).
# Usage: studies/gpu/wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
mkdir -p "$DEST"
# compiled wheels (CPython 3.12, manylinux x86-64)
BINARY="sqlalchemy==2.1.9 pyyaml==6.0.3 markupsafe==3.0.3"
# pure-python wheels
PURE="optuna==5.0.0 plotly==7.1.0 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0 tqdm==4.70.1
      narwhals==2.29.0 packaging==26.2 typing_extensions==4.15.0"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for name in $BINARY; do
  python3 -m pip download -q --no-deps $PLAT -d "$DEST" "$name"
done
for name in $PURE; do
  python3 -m pip download -q --no-deps $PLAT --platform any -d "$DEST" "$name"
done
for w in "$DEST"/*.whl; do
  echo "$(basename "$w"):"
  unzip -p "$w" '*/METADATA' | grep ^Requires-Dist | grep -v 'extra ==' | sed 's/^/  /' || true
done
du -ch "$DEST"/*.whl | tail -1
