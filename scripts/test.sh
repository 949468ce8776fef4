#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs them.
# mosquitto comes from Debian; the tests start their own broker on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    fi
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest -q "$@"
