#!/usr/bin/env bash
# Runs one role-tagged vLLM instance that joins a remote pdserve gateway.
#
#   PDSERVE_CONTROL_ADDRESS=GATEWAY_HOST:7000 PDSERVE_CLUSTER_SECRET=... \
#     entrypoints/instance.sh ROLE [pdserve instance flags] [vLLM args]
#
# ROLE is prefill, decode or both (prefill.sh and decode.sh fill it in).
#
# Environment:
#   PDSERVE_CONTROL_ADDRESS required; the gateway's control plane, HOST:PORT or tcp://HOST:PORT
#                           (PDSERVE_SCHEDULER, its old name, still works)
#   PDSERVE_CLUSTER_SECRET  required; the same random string on every host of the cluster
#   PDSERVE_ADVERTISE_HOST  address of this host that the gateway and the other instances
#                           reach (also where the KV data connection binds); default: the
#                           first address of `hostname -I`
#   PDSERVE_HOST            address the HTTP and KV servers bind          (default 0.0.0.0)
#   PDSERVE_PORT            HTTP port of vLLM's OpenAI server             (default 8100)
#   PDSERVE_MODEL           model path or name (default: the bundled SmolLM2-135M-Instruct);
#                           every instance of a cluster must serve the same model
#   PDSERVE_INSTANCE_ID     name in the cluster (default: ROLE-ADVERTISE_HOST-PORT)
#   PDSERVE_KV_PORT         KV server port of TP rank 0; rank r uses +r   (default: a free port)
#   PDSERVE_CONTROL_PORT    engine control port for migration             (default: a free port)
#   PDSERVE_BIN             the pdserve command (default: pdserve on PATH, else ./.venv)
#
# Other arguments go to `pdserve instance`, which passes what it does not know to vLLM,
# e.g. --max-num-seqs 64 --kv-cache-gib 4 --cpu-cores 0-15.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=entrypoints/common.sh
. "$here/common.sh"
case "${1:-}" in
  -h|--help) usage "$0"; exit 0 ;;
  "") usage "$0" >&2; exit 2 ;;
  prefill|decode|both) role=$1; shift ;;
  *) echo "instance.sh: ROLE must be prefill, decode or both, not '$1'" >&2; exit 2 ;;
esac

me=instance.sh
require_secret "$me"
control=${PDSERVE_CONTROL_ADDRESS:-${PDSERVE_SCHEDULER:-}}
if [ -z "$control" ]; then
  echo "$me: set PDSERVE_CONTROL_ADDRESS to the gateway's control plane, e.g. 10.0.0.1:7000" >&2
  exit 2
fi
case "$control" in tcp://*) ;; *) control="tcp://$control" ;; esac

advertise=${PDSERVE_ADVERTISE_HOST:-}
if [ -z "$advertise" ]; then
  advertise=$(hostname -I 2>/dev/null | awk '{print $1}') || true
  if [ -z "$advertise" ]; then
    echo "$me: set PDSERVE_ADVERTISE_HOST to this host's address on the cluster network" >&2
    exit 2
  fi
  echo "$me: advertising $advertise (set PDSERVE_ADVERTISE_HOST to choose)" >&2
fi

bin=$(pdserve_bin)
args=(
  --role "$role"
  --control-address "$control"
  --host "${PDSERVE_HOST:-0.0.0.0}"
  --port "${PDSERVE_PORT:-8100}"
  --advertise-host "$advertise"
)
[ -n "${PDSERVE_MODEL:-}" ] && args+=(--model "$PDSERVE_MODEL")
[ -n "${PDSERVE_INSTANCE_ID:-}" ] && args+=(--instance-id "$PDSERVE_INSTANCE_ID")
[ -n "${PDSERVE_KV_PORT:-}" ] && args+=(--kv-port "$PDSERVE_KV_PORT")
[ -n "${PDSERVE_CONTROL_PORT:-}" ] && args+=(--control-port "$PDSERVE_CONTROL_PORT")
echo "$me: $bin instance ${args[*]} $*" >&2
exec "$bin" instance "${args[@]}" "$@"
