#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent: skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v mariadb-install-db >/dev/null 2>&1 || [ -x /usr/bin/mariadb-install-db ] || missing+=(mariadb-server)
id postgres >/dev/null 2>&1 || missing+=(postgresql)
# Pebble (Let's Encrypt's test CA) and its DNS server, for crates/acme's tests.
command -v pebble >/dev/null 2>&1 || [ -x /usr/bin/pebble ] || missing+=(pebble)
command -v pebble-challtestsrv >/dev/null 2>&1 || [ -x /usr/bin/pebble-challtestsrv ] || missing+=(pebble)
# promtool (from Prometheus) checks and unit-tests the chart's alert rules (tests/chart).
command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ] || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: PostgreSQL, MariaDB, Pebble and promtool binaries present"
fi

if python3 -m pip install -q --disable-pip-version-check \
    -r tests/chart/requirements.txt -r tests/requirements-kms.txt; then
  echo "setup: Python test packages present (chart tests, moto for KMS)"
else
  echo "setup: pip install failed" >&2
  exit 1
fi
