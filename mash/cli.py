"""The ``mash`` command: a thin shell over the library (each subcommand calls one function)."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path

from mash import (__version__, backup, dashboard, devserver, doctor, export, reader, releases, service,
                  simulator, supervisor, tasks, update, worker)
from mash.config import ConfigError, Settings, check_notify_urls, home
from mash.contract import ROOMS
from mash.control import effective_modes
from mash.dashboard import auth as dashboard_auth
from mash.dashboard import lan, mdns, pairing
from mash.logs import setup_logging, start_process
from mash.models import SchemaTooNew, Store, StoreCorrupt, StoreMissing, StoreOutdated
from mash.models.stats import SINK_WORDS, sink_states
from mash.tasks import notify as notifications
from mash.tasks import sync


def cmd_run(args) -> int:
    settings = Settings.load()
    setup_logging(settings.log_level)
    return supervisor.run(settings, interval=args.interval)


def cmd_reader(args) -> int:
    return reader.main()


def cmd_worker(args) -> int:
    return worker.main()


def cmd_simulate(args) -> int:
    simulator.main(interval=args.interval, link=args.link)
    return 0


def cmd_devserver(args) -> int:
    return devserver.main(args)


def cmd_devserver_command(args) -> int:
    try:
        params = json.loads(args.parameters)
    except ValueError:
        print("parameters must be JSON, e.g. '{\"actuator\":\"MIST_MAKER\",\"state\":\"ON\"}'",
              file=sys.stderr)
        return 2
    print(json.dumps(devserver.issue_command(args.url, args.device, args.command, params,
                                             expires_in=args.expires_in), indent=2))
    return 0


def cmd_sync(args) -> int:
    store = Store(Settings.load().db_path)
    if args.retry_rejected:
        n = store.retry_rejected()
        print(f"{n} rejected readings queued to be sent again", file=sys.stderr)
    start_pending = store.pending_count()
    tasks.force_sync()
    print(f"sync enqueued ({start_pending} readings pending)", file=sys.stderr, flush=True)
    if not args.wait:
        return 0
    return wait_for_drain(store, start_pending, args.timeout)


def wait_for_drain(store: Store, start_pending: int, timeout: float, out=sys.stderr) -> int:
    """A progress bar (readings/s, ETA) until nothing is pending, or ``timeout`` passes."""
    t0 = time.monotonic()
    while True:
        pending = store.pending_count()
        done = max(0, start_pending - pending)
        elapsed = time.monotonic() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = done / start_pending if start_pending else 1.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = f"{pending / rate:.0f} s" if rate > 0 else "?"
        print(f"\r[{bar}] {done}/{start_pending}  {rate:.0f} readings/s  ETA {eta}   ",
              end="", file=out, flush=True)
        if pending == 0:
            print(f"\nbacklog drained in {elapsed:.1f} s", file=out, flush=True)
            return 0
        if elapsed > timeout:
            print(f"\ngave up after {timeout:.0f} s: {pending} readings still pending "
                  "(is the worker running? see `mash status`)", file=out, flush=True)
            return 1
        time.sleep(0.5)


def cmd_status(args) -> int:
    settings = Settings.load()
    stats = status_report(settings, Store(settings.db_path, readonly=True))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print("\n".join(status_lines(stats)))
    return 0


def status_report(settings: Settings, store: Store) -> dict:
    """The guide's stats, plus each sink's state in words and each room's mode."""
    stats = store.get_stats()
    stats["mode"] = effective_modes(settings.control_mode,
                                    (store.meta_get("configuration") or {}).get("mode"))
    stats["sinks"] = {name: SINK_WORDS.get(state, state) for name, state in
                      sink_states(store, settings, stats["processes"]).items()}
    if settings.notify_urls:
        stats["notifications"] = notifications.url_states(store, settings)
    if settings.backend_enabled and settings.backend_profile == "mash":
        stats["backend_profile"] = "mash"
        stats["backend_identity"] = store.meta_get(sync.IDENTITY) or {}
        stats["backend_sensors_missing"] = store.meta_get(sync.SENSORS_MISSING) or {}
        stats["backend_resent_unanswered"] = store.counters().get("sync_resent_unanswered", 0)
    return stats


def _process_line(name: str, beat: dict | None) -> str:
    if not beat:
        return f"{name}:   never started"
    if beat["alive"]:
        version = f"version {beat['version']}, " if beat.get("version") else ""
        return f"{name}:   running (pid {beat['pid']}, {version}heartbeat {beat['age_s']:.0f} s ago)"
    why = "stopped" if beat.get("stopped") else "not running"
    return f"{name}:   {why} (last heartbeat {beat['at']}, {beat['age_s']:.0f} s ago)"


def status_lines(stats: dict) -> list[str]:
    procs = stats["processes"]
    lines = [_process_line("reader", procs.get("reader")), _process_line("worker", procs.get("worker"))]
    board = (procs.get("reader") or {}).get("board")
    if board and (procs["reader"]["alive"]):
        lines.append(f"board:    connected on {board['port']} since {board['since']}" if board["connected"]
                     else f"board:    not connected since {board['since']} ({board.get('problem')})")
    lines += [f"{name + ':':<9} {state}" for name, state in stats["sinks"].items()]
    identity = stats.get("backend_identity")
    if identity is not None:
        if identity.get("state") == "registered":
            lines.append(f"device:   {identity['serial']} is device {identity['cuid']} on the "
                         "MASH backend")
        elif identity.get("state") == "unknown":
            lines.append(f"device:   NOT REGISTERED since {identity['since']}: {identity['problem']}")
        else:
            lines.append("device:   not registered with the MASH backend yet")
        missing = stats["backend_sensors_missing"]
        if missing:
            lines.append(f"sensors:  missing on the backend: {', '.join(missing['missing'])} "
                         f"({missing['problem']}); their readings stay owed")
        if stats["backend_resent_unanswered"]:
            lines.append(f"resent:   {stats['backend_resent_unanswered']} readings resent after an "
                         "upload got no answer (the backend may hold them twice)")
    for n in stats.get("notifications", {}).values():
        lines.append(f"notify:   {n['url']}: last sent {n['last_ok'] or 'never'}, {n['delivered']} sent, "
                     f"{n['owed']} owed, {n['suppressed']} suppressed"
                     + (f", {n['failures']} failures ({n['last_error']})" if n["failures"] else ""))
    lines.append(f"synced:   {stats['total_synced']}")
    lines.append(f"pending:  {stats['pending_records']} (oldest {stats['oldest_pending_age_s']:.0f} s old)")
    if stats["clock_held_readings"]:
        lines.append(f"clock:    not synchronized yet: {stats['clock_held_readings']} readings held "
                     "until it is (NTP, or the backend's time)")
    if stats.get("local_records"):
        lines.append(f"local:    {stats['local_records']} simulated readings, never sent (SIM_SYNC=0)")
    if stats["rejected_records"]:
        lines.append(f"rejected: {stats['rejected_records']} (mash sync --retry-rejected sends them again)")
    lines.append(f"firebase lag: {stats['firebase_lag_records']} readings")
    lines.append(f"last sync: {stats['last_sync'] or 'never'}")
    lines.append(f"last reading: {stats['last_reading'] or 'none yet'}")
    lines.append(f"alerts undelivered: {stats['alerts_pending']}, command acks undelivered: "
                 f"{stats['commands_unacked']}, bad lines: {stats['bad_lines']}")
    lines.append("climate control: " + ", ".join(f"{room} {m}" for room, m in stats["mode"].items()))
    for actuator, a in stats["actuators"].items():
        lines.append(f"  {actuator:<22} {a['state']:<3} set by {a['source']} since {a['since']}")
    return lines


def cmd_export(args) -> int:
    settings = Settings.load()
    try:
        start, end = export.parse_when(args.start), export.parse_when(args.end)
    except ValueError as exc:
        print(f"mash export: {exc}", file=sys.stderr)
        return 2
    store = Store(settings.db_path, readonly=True)
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        n = export.export(store, out, start=start, end=end, room=args.room, fmt=args.format)
    except BrokenPipeError:          # `mash export | head`: the reader of the pipe left
        return 0
    finally:
        if args.output:
            out.close()
    print(f"exported {n} readings" + (f" to {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0


def cmd_dashboard(args) -> int:
    settings = start_process()          # the umask: set-password may be what makes the store
    if settings is None:
        return 2
    if args.action == "set-password":
        return set_dashboard_password(Store(settings.db_path))
    return dashboard.serve(settings)


def set_dashboard_password(store: Store, stdin=sys.stdin, out=sys.stderr) -> int:
    """Read the new password twice: from the terminal (not echoed), or two lines of stdin."""
    if stdin.isatty():
        first, second = getpass.getpass("New dashboard password: "), getpass.getpass("Again: ")
    else:
        first, second = stdin.readline().rstrip("\n"), stdin.readline().rstrip("\n")
    if first != second:
        print("the two passwords differ: nothing changed", file=out)
        return 2
    try:
        dashboard_auth.set_password(store, first)
    except dashboard_auth.PasswordError as exc:
        print(f"{exc}: nothing changed", file=out)
        return 2
    print("dashboard password set (stored as a salted scrypt hash); every session is logged out",
          file=out)
    return 0


def cmd_pair(args) -> int:
    """``mash pair``: the grower app's pairing QR in the terminal, and the URLs of the app's
    API and the dashboard by name and by address (CONTRACT §10)."""
    settings = Settings.load()
    state = None
    if settings.db_path.exists():
        state = mdns.live(Store(settings.db_path, readonly=True))
    addresses = lan.lan_ipv4()
    advertised = bool(state and state.get("addresses"))
    links = pairing.links(settings, advertised, addresses)
    out = sys.stdout
    if links["app"]["url"]:
        address = lan.url_host(settings.device_id, False, settings.phone_api_host, addresses)
        payload = pairing.app_payload(settings, address)
        print("Scan with the MASH grower app (Connect to device, QR):", file=out)
        print(pairing.terminal(payload), end="", file=out)
        print(payload, file=out)
    print("mDNS: " + (f"advertising {', '.join(s['name'] for s in state['services'])} on "
                      f"{state['host']} ({', '.join(state['addresses'])})" if advertised else
                      "off (MDNS=0)" if not settings.mdns else
                      "not advertised now (the dashboard, which advertises, is not running)"),
          file=out)
    for key, label in (("app", f"app API ({settings.phone_api})"), ("dashboard", "dashboard")):
        link = links[key]
        if not link["url"]:
            print(f"{label}: {link['note']}", file=out)
            continue
        for how in ("by_name", "by_address"):
            if link[how]:
                print(f"{label} {how.replace('_', ' ')}: {link[how]}", file=out)
    return 0 if links["app"]["url"] or links["dashboard"]["url"] else 1


def cmd_doctor(args) -> int:
    return doctor.main(as_json=args.json, send=args.send)


def cmd_notify(args) -> int:
    """``mash notify --test``: one test message to each NOTIFY_URLS URL, now."""
    settings = Settings.load()
    if not settings.notify_urls:
        print("NOTIFY_URLS is not set: nothing to send to", file=sys.stderr)
        return 1
    check_notify_urls(settings.notify_urls)        # a ConfigError: one line, exit code 2
    failed = 0
    for label, error in notifications.send_test(settings).values():
        print(f"✓ {label}: delivered" if error is None else f"✗ {error}")
        failed += error is not None
    return 1 if failed else 0


def cmd_service(args) -> int:
    unit_dir = Path(args.unit_dir) if args.unit_dir else service.UNIT_DIR
    if args.action == "uninstall":
        return service.uninstall(unit_dir, stop=not args.no_start)
    user = args.user or service.default_user()
    backups = (Path(args.backup_dir).resolve(), args.backup_keep) if args.backup_dir else None
    if args.dry_run:
        for name, text in service.units(user, backups=backups).items():
            print(f"# {name}\n{text}")
        ok, why = service.serial_access(user)
        print(("# ✓ " if ok else "# ✗ ") + why)
        return 0
    return service.install(user, unit_dir, start=not args.no_start, backups=backups)


def cmd_version(args) -> int:
    """The running version; ``--check``: this release's own check, as JSON (``mash update``
    runs it in a new release before switching to it)."""
    if args.check:
        print(json.dumps(update.check_here(Settings.load())))
        return 0
    current = releases.current_version(home())
    print(__version__ + (f" (current: {current})" if current and current != __version__ else ""))
    return 0


def cmd_update(args) -> int:
    settings = Settings.load()
    if args.recover:
        outcome = update.recover(settings)
        if outcome is not None:
            print(outcome.message)
        return 0 if outcome is None or outcome.ok else 1
    if args.command_id:
        return update.run_command(settings, args.command_id)
    if not args.source:
        print("mash update: give a wheel (path or https URL) or a release manifest URL",
              file=sys.stderr)
        return 2
    try:
        outcome = update.update(settings, args.source, args.sha256, force=args.force)
    except update.UpdateError as exc:
        print(f"mash update: refused: {exc}", file=sys.stderr)
        return 1
    print(f"{outcome.message} ({outcome.seconds:.1f} s)")
    return 0 if outcome.ok else 1


def cmd_restart(args) -> int:
    settings = Settings.load()
    if args.command_id:
        return update.run_command(settings, args.command_id)
    try:
        outcome = update.restart(settings)
    except update.UpdateError as exc:
        print(f"mash restart: {exc}", file=sys.stderr)
        return 1
    print(f"{outcome.message} ({outcome.seconds:.1f} s)")
    return 0 if outcome.ok else 1


def cmd_backup(args) -> int:
    settings = Settings.load()
    try:
        if args.every:
            if not args.output:
                print("mash backup --every: give the directory to keep them in (-o DIR)",
                      file=sys.stderr)
                return 2
            return backup.rolling(settings, Path(args.output), args.every, args.keep or 7)
        if args.keep is not None:
            if not args.output:
                print("mash backup --keep: give the directory to keep them in (-o DIR)",
                      file=sys.stderr)
                return 2
            backup.backup_into(settings, Path(args.output), args.keep)
            return 0
        path, manifest = backup.backup(settings, Path(args.output) if args.output else None)
    except backup.BackupError as exc:
        print(f"mash backup: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: store {manifest['store_uid']}, schema v{manifest['schema']}, "
          f"{manifest['counts']['sensor_data']} readings, {path.stat().st_size} bytes")
    return 0


def cmd_restore(args) -> int:
    settings = Settings.load()
    try:
        backup.restore(settings, Path(args.archive), force=args.force)
    except backup.BackupError as exc:
        print(f"mash restore: refused: {exc}", file=sys.stderr)
        return 1
    print("restored; `mash doctor` says:", file=sys.stderr, flush=True)
    if doctor.main() != 0:
        print("(the reader and worker checks pass once the services run: `mash run`, or "
              "`sudo systemctl start mash-reader mash-worker mash-dashboard`)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mash", description="MASH gateway")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("version", help="the running version")
    s.add_argument("--check", action="store_true",
                   help="this release's own check (imports, settings, store), as JSON")
    s.set_defaults(func=cmd_version)
    s = sub.add_parser("update", help="install a new release beside this one; keep it only if healthy")
    s.add_argument("source", nargs="?", help="a wheel (path or https URL) or a release manifest URL")
    s.add_argument("--sha256", help="the wheel's sha256 (required for a URL without a manifest)")
    s.add_argument("--force", action="store_true", help="try a version recorded bad again")
    s.add_argument("--command", dest="command_id", help=argparse.SUPPRESS)
    s.add_argument("--recover", action="store_true",
                   help="judge and finish an update that was interrupted (the worker runs it)")
    s.set_defaults(func=cmd_update)
    s = sub.add_parser("restart", help="restart the services and wait until they are back")
    s.add_argument("--command", dest="command_id", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_restart)
    s = sub.add_parser("backup", help="the store, config/.env and the Firebase key in one archive")
    s.add_argument("-o", "--output", help="the archive, or a directory (default data/backups)")
    s.add_argument("--every", help="keep rolling backups in -o DIR: every 30m, 6h, 1d ...")
    s.add_argument("--keep", type=int, default=None,
                   help="into the directory -o DIR, keeping the newest N (with --every: 7)")
    s.set_defaults(func=cmd_backup)
    s = sub.add_parser("restore", help="a backup onto this install, then `mash doctor`")
    s.add_argument("archive")
    s.add_argument("--force", action="store_true", help="replace a store that holds readings")
    s.set_defaults(func=cmd_restore)
    s = sub.add_parser("run", help="reader and worker together (simulated board if none attached)")
    s.add_argument("--interval", type=float, default=5.0, help="simulated reading interval, s")
    s.set_defaults(func=cmd_run)
    sub.add_parser("reader", help="the serial reader service").set_defaults(func=cmd_reader)
    sub.add_parser("worker", help="the Huey worker").set_defaults(func=cmd_worker)
    s = sub.add_parser("simulate", help="a simulated board on a pseudo-terminal")
    s.add_argument("--interval", type=float, default=5.0)
    s.add_argument("--link", help="also expose the pty under this path (a symlink)")
    s.set_defaults(func=cmd_simulate)
    s = sub.add_parser("devserver", help="the reference backend on loopback")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000, help="0 picks a free port")
    s.add_argument("--db", default="data/devserver.db")
    s.add_argument("--profile", choices=("guide", "mash"), default="guide",
                   help="guide: CONTRACT §2 (default); mash: a replica of the deployed MASH "
                        "backend, CONTRACT §9")
    s.add_argument("--access-ttl", type=float, default=None,
                   help="seconds (default: guide 900, mash 1 day)")
    s.add_argument("--refresh-ttl", type=float, default=None,
                   help="seconds (default: guide 7 days, mash 30 days)")
    s.add_argument("--rate-limit", type=int, default=None,
                   help="requests per client and URL per --rate-window s before 429 "
                        "(0: none; default: guide 0, mash 20)")
    s.add_argument("--rate-window", type=float, default=None, help="seconds (default 60)")
    s.add_argument("--populated", action=argparse.BooleanOptionalAction, default=None,
                   help="mash: seed another farm's active device, so the registration "
                        "fall-back bug fires as in production (default: on)")
    s.add_argument("--user", action="append", default=[],
                   help="EMAIL:PASSWORD of an account (default: the .env device account)")
    s.add_argument("--secret", default=None, help="HS256 signing secret (default: random)")
    s.set_defaults(func=cmd_devserver)
    s = sub.add_parser("devserver-command", help="issue a command through the reference backend")
    s.add_argument("command", help="set_actuator, REQUEST_STATUS, force_sync, CONFIGURE")
    s.add_argument("parameters", nargs="?", default="{}", help="JSON parameters")
    s.add_argument("--url", default="http://127.0.0.1:3000")
    s.add_argument("--device", default=os.environ.get("DEVICE_ID", "rpi_gateway_001"))
    s.add_argument("--expires-in", type=float, default=None, help="seconds until it expires")
    s.set_defaults(func=cmd_devserver_command)
    s = sub.add_parser("sync", help="enqueue a forced sync now")
    s.add_argument("--wait", action="store_true", help="wait for the backlog to drain")
    s.add_argument("--timeout", type=float, default=3600.0)
    s.add_argument("--retry-rejected", action="store_true",
                   help="send readings the backend refused (synced = -1) again")
    s.set_defaults(func=cmd_sync)
    s = sub.add_parser("export", help="readings as CSV or JSON lines, streamed")
    s.add_argument("--from", dest="start", help="first time included (UTC): 2026-11-01 or 2026-11-01T06:00")
    s.add_argument("--to", dest="end", help="first time excluded (UTC)")
    s.add_argument("--room", choices=ROOMS)
    s.add_argument("--format", choices=export.FORMATS, default="csv")
    s.add_argument("-o", "--output", help="file to write (default: standard output)")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("dashboard", help="the grower's page (DASHBOARD_HOST:DASHBOARD_PORT)")
    s.add_argument("action", nargs="?", choices=("serve", "set-password"), default="serve")
    s.set_defaults(func=cmd_dashboard)
    s = sub.add_parser("pair", help="the grower app's pairing QR and this gateway's URLs")
    s.set_defaults(func=cmd_pair)
    s = sub.add_parser("doctor", help="check every part, in order, each with its fix")
    s.add_argument("--json", action="store_true")
    s.add_argument("--send", action="store_true", help="also send a test notification to each URL")
    s.set_defaults(func=cmd_doctor)
    s = sub.add_parser("notify", help="alert notifications (NOTIFY_URLS)")
    s.add_argument("--test", action="store_true", required=True,
                   help="send a test message to each URL now")
    s.set_defaults(func=cmd_notify)
    s = sub.add_parser("service", help="systemd units for the reader and the worker")
    s.add_argument("action", choices=("install", "uninstall"))
    s.add_argument("--user", help="who the services run as (default: you, or who ran sudo)")
    s.add_argument("--dry-run", action="store_true", help="print the units, change nothing")
    s.add_argument("--unit-dir", help=f"where the units go (default {service.UNIT_DIR})")
    s.add_argument("--no-start", action="store_true", help="write the units only (no systemctl)")
    s.add_argument("--backup-dir", help="also a daily backup timer into this directory "
                                        "(another disk, say)")
    s.add_argument("--backup-keep", type=int, default=7, help="backups the timer keeps")
    s.set_defaults(func=cmd_service)
    s = sub.add_parser("status", help="the guide's sync stats")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (StoreMissing, StoreOutdated, SchemaTooNew) as exc:   # status, export: read-only
        print(exc, file=sys.stderr)
        return 1
    except StoreCorrupt as exc:
        print(f"the store cannot be read ({exc}): the reader sets a corrupt store aside "
              "and starts a fresh one when it opens it; `mash doctor` checks it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
