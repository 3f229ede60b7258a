# Shared by the entrypoint scripts (sourced, not run): finds pdserve and checks the secret.
# shellcheck shell=bash

# The pdserve command: $PDSERVE_BIN, else `pdserve` on PATH, else this checkout's .venv.
pdserve_bin() {
  if [ -n "${PDSERVE_BIN:-}" ]; then
    echo "$PDSERVE_BIN"
  elif command -v pdserve >/dev/null 2>&1; then
    command -v pdserve
  else
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    if [ -x "$here/../.venv/bin/pdserve" ]; then
      echo "$here/../.venv/bin/pdserve"
    else
      echo "entrypoints: no pdserve found: set PDSERVE_BIN or run scripts/setup.sh" >&2
      return 1
    fi
  fi
}

# Every host of a cluster needs the same secret; pdserve refuses to listen beyond loopback
# without one.
require_secret() {
  if [ -z "${PDSERVE_CLUSTER_SECRET:-}" ]; then
    echo "$1: set PDSERVE_CLUSTER_SECRET to the same random string on every host, e.g." >&2
    echo "  export PDSERVE_CLUSTER_SECRET=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" >&2
    return 1
  fi
  export PDSERVE_CLUSTER_SECRET
}

# Prints the usage header of a script: its comment block after the shebang.
usage() {
  sed -n '2,/^set -euo pipefail/p' "$1" | sed -e '$d' -e 's/^# \{0,1\}//'
}
