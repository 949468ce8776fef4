#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs them.
# The gateway and the test tools go into a virtual environment (.venv), so this works with
# Debian's / Raspberry Pi OS's externally managed /usr/bin/python3 (PEP 668) as with any other
# Python 3.11+. mosquitto and chromium come from Debian; the tests start their own broker and
# browser on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto mosquitto-clients)
# the dashboard's browser tests: Debian's Chromium and its driver (nothing downloads a browser)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# the pairing QR's test decodes it with zbar's zbarimg
command -v zbarimg >/dev/null 2>&1 || need+=(zbar-tools)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The tests' stores, queues and logs go to RAM when there is some: the suite fsyncs on every
# reading, and what it checks is the gateway's logic, not the disk's.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR
    TMPDIR="$(mktemp -d /dev/shm/mash-tests.XXXXXX)"
    trap 'rm -rf "$TMPDIR"' EXIT
    set -- --basetemp="$TMPDIR/pytest" "$@"
fi
# Three workers, a test file each at a time: most tests wait on real processes, brokers and
# serial lines, so three files share the two cores without a test's own timing being squeezed
# (the parallel part: 7 min with three, 12 with two). The
# few marked `solo` run the real chamber against the wall clock at many times its pace, where
# a neighbour's load would shift their phases: they run afterwards, alone. (Exit code 5 is
# pytest's "no test selected": a file list naming no solo test, or only solo tests.)
status=0
.venv/bin/python -m pytest -q -n 3 --dist loadfile --durations=15 -m "not solo" "$@" || status=$?
solo=0
.venv/bin/python -m pytest -q -m solo "$@" || solo=$?
if [ "$status" = 5 ] && [ "$solo" != 5 ]; then status=0; fi
if [ "$solo" = 5 ] && [ "$status" != 5 ]; then solo=0; fi
[ "$status" != 0 ] && exit "$status"
exit "$solo"
