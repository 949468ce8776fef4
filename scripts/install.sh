#!/usr/bin/env bash
# The README's install: this checkout as the first release, releases/<version>/ (a virtual
# environment, so Debian's externally managed /usr/bin/python3 is fine, PEP 668), `current`
# pointing at it, and `.venv` pointing at `current` (every `.venv/bin/mash ...` in the README
# runs the current release). Run again after a `git pull`: it reinstalls into the same release.
# `mash update` lays new releases beside this one (mash/releases.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' mash/__init__.py)"
release="releases/$version"
[ -x "$release/bin/python" ] || "$PYTHON" -m venv "$release"
"$release/bin/pip" install -q --disable-pip-version-check -e '.[firebase]'
ln -sfn "$release" .current.tmp && mv -Tf .current.tmp current
if [ -d .venv ] && [ ! -L .venv ]; then
    echo "install.sh: .venv is an old environment; \`rm -rf .venv\` and run again to link it to current" >&2
else
    ln -sfn current .venv
fi
echo "installed $version in $release (current -> $release)"
