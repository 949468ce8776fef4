"""Releases side by side: ``<home>/releases/<version>/`` is one virtual environment each, and
``<home>/current`` is a relative symlink to the one the services run. The units and ``mash
run`` start ``<home>/current/bin/python``, so switching the link (atomically: a new link
renamed over the old one) and restarting the services is the whole switch, and switching it
back is the whole rollback. ``releases/releases.json`` remembers which versions were kept
(newest last) and which failed their health window (never tried again unless asked).

    <home>/current -> releases/0.1.1
    <home>/releases/0.1.0/      (the last good one before: kept for a rollback)
    <home>/releases/0.1.1/      (bin/python, lib/..., pyvenv.cfg)
    <home>/releases/releases.json
    <home>/releases/pending.json  (only while an update awaits its verdict)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

RELEASES = "releases"
CURRENT = "current"
STATE = "releases.json"
PENDING = "pending.json"    # an update between its switch and its verdict (mash.update)
KEEP_GOOD = 2           # the running release and the one before it


def releases_dir(home: Path) -> Path:
    return home / RELEASES


def current_link(home: Path) -> Path:
    return home / CURRENT


def laid_out(home: Path) -> bool:
    """Is this home laid out as releases (``current`` a link to one of them)?"""
    return current_link(home).is_symlink()


def current_release(home: Path) -> Path | None:
    """The release directory ``current`` points at, or None."""
    link = current_link(home)
    return link.resolve() if link.is_symlink() else None


def current_version(home: Path) -> str | None:
    release = current_release(home)
    return release.name if release else None


def python(home: Path) -> str:
    """The interpreter a service is started with: ``<home>/current/bin/python`` when the home
    is laid out as releases (so a restart runs whatever ``current`` says), else this one."""
    candidate = current_link(home) / "bin" / "python"
    return str(candidate) if laid_out(home) and candidate.exists() else sys.executable


def switch(home: Path, release: Path) -> Path | None:
    """Point ``current`` at ``release`` in one rename; returns what it pointed at before."""
    before = current_release(home)
    link = current_link(home)
    tmp = link.with_name(f".{CURRENT}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(release, home))
    os.replace(tmp, link)
    return before


def copy_env(src: Path, dest: Path) -> None:
    """Copy the virtual environment ``src`` to ``dest``, then rewrite the absolute paths a
    venv keeps of itself (the scripts' ``#!`` lines, ``activate``, ``pyvenv.cfg``): a venv is
    not relocatable, and a script still naming the old one would run the old code."""
    src, dest = Path(src).resolve(), Path(dest)
    shutil.copytree(src, dest, symlinks=True)
    old, new = str(src).encode(), str(dest.resolve()).encode()
    for path in [*(dest / "bin").iterdir(), dest / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data[:1024]:
            path.write_bytes(data.replace(old, new))


class State:
    """``releases.json``: ``good`` (versions kept, newest last) and ``bad`` ({version: why})."""

    def __init__(self, home: Path):
        self.path = releases_dir(home) / STATE
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.good: list[str] = list(data.get("good", []))
        self.bad: dict[str, str] = dict(data.get("bad", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"good": self.good, "bad": self.bad}, indent=1))
        os.replace(tmp, self.path)

    def kept(self, version: str) -> None:
        self.good = [v for v in self.good if v != version] + [version]
        self.bad.pop(version, None)
        self.save()

    def failed(self, version: str, why: str) -> None:
        self.good = [v for v in self.good if v != version]
        self.bad[version] = why
        self.save()


def prune(home: Path, state: State, keep: int = KEEP_GOOD) -> list[str]:
    """Remove every release but the last ``keep`` good ones and the current one; returns the
    versions removed."""
    wanted = set(state.good[-keep:]) | {current_version(home)}
    removed = []
    for release in sorted(releases_dir(home).iterdir()):
        if release.is_dir() and not release.is_symlink() and release.name not in wanted:
            shutil.rmtree(release, ignore_errors=True)
            removed.append(release.name)
    state.good = [v for v in state.good if v in wanted]
    state.save()
    return removed
