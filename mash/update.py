"""``mash update SOURCE [--sha256 HEX]`` and ``mash restart``: a new release beside the old
one, switched to only when its services prove healthy, else switched back.

The steps, each refusing with the reason before the next (``UpdateError``):

1. something supervises the services (``mash run``'s supervisor, or the systemd units), and
   the home is laid out as releases (``mash.releases``);
2. the wheel is fetched (a path, an https URL, or a release manifest
   ``{"version","url","sha256"}``) and its sha256 checked, before anything runs (required for a
   URL); a version recorded bad is refused (``--force`` tries it again);
3. the new release is the current one's environment copied, then ``pip install`` of the
   wheel into it (pip's own settings apply: ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` for an offline
   wheelhouse); the dependencies already there are not fetched again;
4. the new release checks itself (``mash version --check``: its imports, the settings, the
   store opens) and says its schema; one whose store the running release could not open after
   a rollback (``COMPATIBLE_FROM`` above our ``SCHEMA_VERSION``) is refused;
5. ``current`` is switched (one rename) and the services restarted; the new release is kept
   only when the reader's and the worker's heartbeats come back from it and neither restarts
   within ``UPDATE_HEALTH_WINDOW``; otherwise ``current`` goes back, the old release is
   restarted and the version is recorded bad, with why.

The store is outside the releases, so nothing stored during the window is lost either way.
A remote ``update`` / ``RESTART`` (``mash.tasks.intake``) runs this with ``--command ID`` and
the ledger row is finished here: completed with the version, or failed with the reason.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from mash import __version__, releases, service, supervisor
from mash.config import Settings, home, is_loopback
from mash.models import COMPATIBLE_FROM, SCHEMA_VERSION, Store, StoreOutdated

SERVICES = ("reader", "worker")
PENDING = releases.PENDING
UNITS = [f"{u.name}.service" for u in service.UNITS]
WHEEL_RE = re.compile(r"^mash_gateway-(?P<version>[^-]+)-.*\.whl$")
FETCH_TIMEOUT = 60


class UpdateError(Exception):
    """An update refused before the switch: nothing changed."""


@dataclass
class Outcome:
    ok: bool
    version: str                 # what runs now
    message: str                 # the reason, or what was done
    seconds: float = 0.0


def log(msg: str, out=sys.stderr) -> None:
    print(f"mash update: {msg}", file=out, flush=True)


# -- the source ---------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise UpdateError(f"{url}: only https:// (plain http only on a loopback host)")


def _download(url: str, dest: Path) -> None:
    _check_url(url)
    try:
        with requests.get(url, stream=True, timeout=FETCH_TIMEOUT) as r:
            r.raise_for_status()
            with open(dest, "wb") as f:
                for chunk in r.iter_content(1 << 16):
                    f.write(chunk)
    except requests.RequestException as exc:
        raise UpdateError(f"could not fetch {url}: {exc}") from None


def fetch(source: str, sha256: str | None, incoming: Path) -> tuple[Path, str]:
    """``(wheel path, version)`` of ``source``, its sha256 checked. A URL needs a sha256
    (``--sha256``, or the manifest's); a local wheel is checked when one is given."""
    expected = sha256.lower() if sha256 else None
    incoming.mkdir(parents=True, exist_ok=True)
    manifest_version = None
    if "://" in source and not source.startswith("file://"):
        url = source
        if not urlsplit(url).path.endswith(".whl"):          # a release manifest
            _check_url(url)
            try:
                manifest = requests.get(url, timeout=FETCH_TIMEOUT).json()
                manifest_version, url = str(manifest["version"]), str(manifest["url"])
                expected = expected or str(manifest["sha256"]).lower()
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                raise UpdateError(f"{source} is no release manifest "
                                  f'{{"version","url","sha256"}}: {exc}') from None
        if not expected:
            raise UpdateError("a wheel from a URL needs its sha256 (--sha256 HEX)")
        name = Path(urlsplit(url).path).name
        wheel = incoming / name
        _download(url, wheel)
    else:
        wheel = Path(source[len("file://"):] if source.startswith("file://") else source)
        if not wheel.is_file():
            raise UpdateError(f"{wheel}: no such file")
    m = WHEEL_RE.match(wheel.name)
    if not m:
        raise UpdateError(f"{wheel.name} is not a wheel of mash-gateway "
                          "(mash_gateway-<version>-...whl)")
    if expected:
        got = sha256_of(wheel)
        if got != expected:
            if wheel.parent == incoming:
                wheel.unlink()
            raise UpdateError(f"sha256 mismatch for {wheel.name}: expected {expected}, got "
                              f"{got}; nothing installed")
    version = m.group("version")
    if manifest_version is not None and manifest_version != version:
        raise UpdateError(f"the manifest says {manifest_version} but its wheel is {version}")
    return wheel, version


# -- the services -------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def supervisor_pid(settings: Settings) -> int | None:
    """The pid of a running ``mash run``, or None."""
    try:
        pid = int(supervisor.pid_file(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def units_installed() -> bool:
    return shutil.which("systemctl") is not None and all(
        (service.UNIT_DIR / u).exists() for u in UNITS)


def manager(settings: Settings) -> str | None:
    """Who restarts the services: ``mash run`` or ``systemd``; None when nothing does."""
    if supervisor_pid(settings):
        return "mash run"
    if units_installed():
        return "systemd"
    return None


def restart_services(settings: Settings) -> str:
    """Restart the reader, worker and dashboard from ``current``: SIGHUP to ``mash run``;
    under systemd ``systemctl restart`` as root, else SIGTERM to each unit's main process
    (the units' ``Restart=always`` starts it again; no root needed)."""
    pid = supervisor_pid(settings)
    if pid:
        os.kill(pid, signal.SIGHUP)
        return "mash run"
    if not units_installed():
        raise UpdateError("nothing supervises the services (neither `mash run` nor the "
                          "systemd units): nothing would restart them")
    if os.geteuid() == 0:
        subprocess.run(["systemctl", "restart", *UNITS], check=False, capture_output=True)
        return "systemd"
    for unit in UNITS:
        out = subprocess.run(["systemctl", "show", "--value", "-p", "MainPID", unit],
                             capture_output=True, text=True).stdout.strip()
        if out.isdigit() and int(out) > 0:
            try:
                os.kill(int(out), signal.SIGTERM)
            except OSError as exc:
                raise UpdateError(f"cannot restart {unit}: {exc}") from None
    return "systemd"


def beats(store: Store) -> dict:
    procs = store.processes()
    return {name: procs.get(name) or {} for name in SERVICES}


def wait_healthy(store: Store, version: str | None, before: dict, window: float,
                 poll: float = 0.25, judge: bool = True) -> tuple[bool, str]:
    """Within ``window`` s: both services beat again from a new process (of ``version``,
    when given), and (``judge``) neither restarts afterwards (a new pid, or a stopped beat)
    before the window ends. ``(True, "")`` or ``(False, why)``; a restart ends the wait at
    once. Without ``judge`` it returns as soon as both are back."""
    old_pids = {name: (before.get(name) or {}).get("pid") for name in SERVICES}
    seen: dict[str, int] = {}
    deadline = time.monotonic() + window
    while True:
        for name, beat in beats(store).items():
            pid = beat.get("pid")
            fresh = pid is not None and pid != old_pids[name] and not beat.get("stopped")
            if name in seen:
                if pid != seen[name] or beat.get("stopped"):
                    return False, (f"the {name} restarted within the health window "
                                   f"(pid {seen[name]}, then {pid})")
            elif fresh and (version is None or beat.get("version") == version):
                seen[name] = pid
        if not judge and len(seen) == len(SERVICES):
            return True, ""
        if time.monotonic() >= deadline:
            missing = [n for n in SERVICES if n not in seen]
            if missing:
                return False, (f"the {' and the '.join(missing)} did not come back"
                               f"{' on ' + version if version else ''} within "
                               f"{window:g} s (no heartbeat)")
            return True, ""
        time.sleep(poll)


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# -- the release --------------------------------------------------------------------------
def self_check(python: Path) -> dict:
    """Run the release's own ``mash version --check``; its JSON, or UpdateError. (Safe path:
    a checkout as the current directory must not shadow the release's package.)"""
    done = subprocess.run([str(python), "-m", "mash", "version", "--check"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONSAFEPATH": "1"})
    if done.returncode != 0:
        raise UpdateError("the new release's own check failed: "
                          + (done.stderr.strip() or done.stdout.strip())[-500:])
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise UpdateError(f"the new release's check said {done.stdout[-200:]!r}") from None


def check_here(settings: Settings) -> dict:
    """This release's own check (``mash version --check``): every service imports, the
    settings load, the store opens. Raises what fails."""
    for module in ("mash.reader", "mash.worker", "mash.tasks", "mash.dashboard", "mash.cli"):
        importlib.import_module(module)
    store = None
    if settings.db_path.exists():
        try:
            store = Store(settings.db_path, readonly=True)
        except StoreOutdated:
            pass                  # the reader migrates it when it starts
        finally:
            if store is not None:
                store.close()
    return {"version": __version__, "schema": SCHEMA_VERSION, "compatible_from": COMPATIBLE_FROM}


def build(home_dir: Path, wheel: Path, version: str, out=sys.stderr) -> Path:
    """The new release: the current one's environment copied, the wheel installed in it."""
    current = releases.current_release(home_dir)
    dest = releases.releases_dir(home_dir) / version
    if dest.exists():
        shutil.rmtree(dest)
    log(f"building release {version} (a copy of {current.name})", out)
    releases.copy_env(current, dest)
    done = subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise UpdateError(f"pip could not install {wheel.name}: {done.stderr.strip()[-800:]}")
    return dest


@contextlib.contextmanager
def one_at_a_time(settings: Settings, wait: float | None = None):
    """One update or restart at a time on this gateway (an flock in the data directory):
    waits for the one running (``wait`` s, default the health window and two minutes more),
    then UpdateError."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    wait = settings.update_health_window + 120 if wait is None else wait
    deadline = time.monotonic() + wait
    with open(settings.data_dir / "update.lock", "w") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UpdateError("another update or restart is running") from None
                time.sleep(0.5)
        yield


def update(settings: Settings, source: str, sha256: str | None = None, force: bool = False,
           out=sys.stderr, command_id: str | None = None) -> Outcome:
    """The whole update (see the module docstring). Raises UpdateError when it is refused
    before the switch; returns the Outcome of the health window otherwise."""
    with one_at_a_time(settings):
        return _update(settings, source, sha256, force, out, command_id)


def _update(settings: Settings, source: str, sha256: str | None, force: bool, out,
            command_id: str | None) -> Outcome:
    home_dir = home()
    t0 = time.monotonic()
    if not releases.laid_out(home_dir):
        raise UpdateError(f"{home_dir} is not laid out as releases (no {releases.CURRENT} "
                          "link): install with scripts/install.sh")
    who = manager(settings)
    if who is None:
        raise UpdateError("nothing supervises the services (neither `mash run` nor the "
                          "systemd units): nothing would restart them")
    old_release = releases.current_release(home_dir)
    old_version = old_release.name
    state = releases.State(home_dir)
    incoming = releases.releases_dir(home_dir) / ".incoming"
    try:
        wheel, version = fetch(source, sha256, incoming)
        if version == old_version:
            raise UpdateError(f"{version} is the running release already")
        if version in state.bad and not force:
            raise UpdateError(f"{version} failed before ({state.bad[version]}): not tried "
                              "again unless --force")
        dest = build(home_dir, wheel, version, out)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    try:
        checked = self_check(dest / "bin" / "python")
        if checked.get("version") != version:
            raise UpdateError(f"the wheel says {version} but the release runs "
                              f"{checked.get('version')}")
        if int(checked.get("compatible_from", 0)) > SCHEMA_VERSION:
            raise UpdateError(f"{version} migrates the store to schema v{checked['schema']}, "
                              f"which {old_version} (v{SCHEMA_VERSION}) could not open after a "
                              "rollback: refused (docs/DESIGN.md, the store across versions)")
    except UpdateError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    store = Store(settings.db_path)
    if not state.good:
        state.kept(old_version)          # the release installed first counts as good
    before = beats(store)
    pending = releases.releases_dir(home_dir) / PENDING
    _write_json(pending, {"from": old_version, "to": version, "command": command_id})
    releases.switch(home_dir, dest)
    log(f"switched {releases.CURRENT} to {version}; restarting the services ({who})", out)
    try:
        restart_services(settings)
        ok, why = wait_healthy(store, version, before, settings.update_health_window)
    except Exception as exc:        # whatever broke after the switch: switch back
        ok, why = False, f"{type(exc).__name__}: {exc}"
    return _judged(settings, store, home_dir, old_release, dest, ok, why, t0, out)


def _judged(settings: Settings, store: Store, home_dir: Path, old_release: Path, dest: Path,
            ok: bool, why: str, t0: float, out) -> Outcome:
    """Keep ``dest`` (healthy) or switch back to ``old_release``; the pending marker goes."""
    old_version, version = old_release.name, dest.name
    state = releases.State(home_dir)
    pending = releases.releases_dir(home_dir) / PENDING
    if ok:
        state.kept(version)
        removed = releases.prune(home_dir, state)
        pending.unlink(missing_ok=True)
        log(f"{version} is healthy: kept" + (f" (removed {', '.join(removed)})" if removed else ""),
            out)
        return Outcome(True, version, f"updated {old_version} -> {version}",
                       time.monotonic() - t0)
    log(f"{version} is not healthy: {why}; switching back to {old_version}", out)
    after = beats(store)
    releases.switch(home_dir, old_release)
    state.failed(version, why)
    try:
        restart_services(settings)
        back, why_not = wait_healthy(store, old_version, after,
                                     max(settings.update_health_window, 60), judge=False)
    except UpdateError as exc:
        back, why_not = False, str(exc)
    pending.unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    log(f"{old_version} is running again" if back else f"{old_version}: {why_not}", out)
    return Outcome(False, old_version, f"rolled back to {old_version}: {why}",
                   time.monotonic() - t0)


def restart(settings: Settings, out=sys.stderr) -> Outcome:
    """``mash restart`` / ``RESTART``: the services restarted; done once both beat again
    from new processes (failed when they have not within the window, at least 60 s)."""
    with one_at_a_time(settings):
        return _restart(settings, out)


def _restart(settings: Settings, out) -> Outcome:
    t0 = time.monotonic()
    store = Store(settings.db_path)
    before = beats(store)
    who = restart_services(settings)
    log(f"restarting the services ({who})", out)
    ok, why = wait_healthy(store, None, before, max(settings.update_health_window, 60),
                           judge=False)
    version = releases.current_version(home()) or __version__
    return Outcome(ok, version, "services restarted" if ok else why, time.monotonic() - t0)


def run_command(settings: Settings, command_id: str, out=sys.stderr) -> int:
    """Run the ledger's ``update`` / ``RESTART`` ``command_id`` and finish it: completed with
    the version running, or failed with the reason."""
    store = Store(settings.db_path)
    row = store.command(command_id)
    if row is None or row.command not in ("update", "RESTART"):
        log(f"no update or RESTART command {command_id} in the ledger", out)
        return 2
    try:
        if row.command == "update":
            params = json.loads(row.parameters or "{}")
            outcome = update(settings, params["url"], params.get("sha256"), out=out,
                             command_id=command_id)
            if outcome.ok and outcome.version != params.get("version"):
                outcome = Outcome(False, outcome.version, f"installed {outcome.version}, "
                                  f"not the {params.get('version')} asked for")
        else:
            outcome = restart(settings, out=out)
    except UpdateError as exc:
        outcome = Outcome(False, releases.current_version(home()) or __version__, str(exc))
    except Exception as exc:          # the ack must say something, whatever broke
        outcome = Outcome(False, releases.current_version(home()) or __version__,
                          f"{type(exc).__name__}: {exc}")
    store.finish_command(command_id, outcome.ok,
                         reason=None if outcome.ok else outcome.message,
                         response={"version": outcome.version, "message": outcome.message})
    log(f"command {command_id} ({row.command}) "
        f"{'completed' if outcome.ok else 'failed'}: {outcome.message}", out)
    return 0 if outcome.ok else 1


def interrupted(home_dir: Path) -> dict | None:
    """The pending marker of an update stopped between its switch and its verdict (a power
    cut, a kill), or None."""
    try:
        return json.loads((releases.releases_dir(home_dir) / PENDING).read_text())
    except (OSError, ValueError):
        return None


def recover(settings: Settings, out=sys.stderr) -> Outcome | None:
    """Finish an interrupted update (the worker starts this at its start when the marker is
    there): the release ``current`` points at is judged afresh over the health window, then
    kept or switched back, and its command finished. None when there is nothing to do, or
    the update is still running (it holds the lock)."""
    home_dir = home()
    try:
        with one_at_a_time(settings, wait=0):
            pending = interrupted(home_dir)
            if pending is None:
                return None
            t0 = time.monotonic()
            rel = releases.releases_dir(home_dir)
            old_release, dest = rel / str(pending.get("from")), rel / str(pending.get("to"))
            log(f"the update {old_release.name} -> {dest.name} was interrupted: judging "
                f"{releases.current_version(home_dir)} again", out)
            store = Store(settings.db_path)
            if releases.current_version(home_dir) != dest.name or not old_release.is_dir():
                (rel / PENDING).unlink(missing_ok=True)
                releases.State(home_dir).failed(dest.name, "interrupted before its verdict")
                outcome = Outcome(False, releases.current_version(home_dir) or __version__,
                                  f"the update to {dest.name} was interrupted")
            else:
                ok, why = wait_healthy(store, dest.name, {}, settings.update_health_window)
                outcome = _judged(settings, store, home_dir, old_release, dest, ok, why, t0, out)
            if pending.get("command"):
                store.finish_command(pending["command"], outcome.ok,
                                     reason=None if outcome.ok else outcome.message,
                                     response={"version": outcome.version,
                                               "message": outcome.message})
            return outcome
    except UpdateError:              # the update itself still runs: it gives the verdict
        return None
