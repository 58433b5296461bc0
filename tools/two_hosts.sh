#!/usr/bin/env bash
# The multi-machine demo on one Linux host: two network namespaces joined by a veth pair stand in for two machines
# (separate network stacks, addresses and routes; one kernel, one disk, one clock). Node 0 (10.77.0.1) holds rank 0
# and the store, node 1 (10.77.0.2) the other ranks; gloo connects over the veth link, never over 127.0.0.1.
# Needs root and iproute2; not part of `make test` (it changes the host's network namespaces, removed on exit).
#
#   sudo tools/two_hosts.sh                       # 2 nodes x 2 processes, --model tiny (checks the exact line)
#   sudo tools/two_hosts.sh 2 --model smollm2     # per-node processes, then any `pskernels demo` flags
#   NO_IFNAME=1 sudo tools/two_hosts.sh           # without GLOO_SOCKET_IFNAME: the demo must refuse, naming it
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-2}
shift || true
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--model tiny)
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
PORT=${PORT:-29547}
A=pskernels-node0 B=pskernels-node1
LOG=$(mktemp -d)

cleanup() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add "$A"
ip netns add "$B"
ip link add psk-veth0 type veth peer name psk-veth1
ip link set psk-veth0 netns "$A"
ip link set psk-veth1 netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev psk-veth0
ip -n "$B" addr add 10.77.0.2/24 dev psk-veth1
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set psk-veth0 up
ip -n "$B" link set psk-veth1 up

node() {  # node() rank interface
    local env=()
    [ -n "${NO_IFNAME:-}" ] || env=(GLOO_SOCKET_IFNAME="$2")
    ip netns exec "$([ "$1" = 0 ] && echo "$A" || echo "$B")" env "${env[@]}" timeout 900 "$TORCHRUN" --nnodes 2 \
        --node-rank "$1" --nproc-per-node "$NPROC" --master-addr 10.77.0.1 --master-port "$PORT" \
        -m pskernels.apps.demo_distributed "${ARGS[@]}"
}
node 0 psk-veth0 > "$LOG/node0.log" 2>&1 & first=$!
rc1=0; node 1 psk-veth1 > "$LOG/node1.log" 2>&1 || rc1=$?
rc0=0; wait $first || rc0=$?
grep -v '^\[\?W[0-9]' "$LOG/node0.log" | grep -v 'torch/distributed/run.py' || true
if [ -n "${NO_IFNAME:-}" ]; then
    grep -h "GLOO_SOCKET_IFNAME" "$LOG/node0.log" "$LOG/node1.log" | head -1
    [ $rc0 -ne 0 ] && [ $rc1 -ne 0 ] && grep -q "set GLOO_SOCKET_IFNAME" "$LOG/node1.log" && echo "refused, as expected"
    exit
fi
[ $rc0 -eq 0 ] && [ $rc1 -eq 0 ] || { echo "node exit codes: $rc0 $rc1 (logs in $LOG)"; exit 1; }
if [[ " ${ARGS[*]} " == *" tiny "* ]]; then  # the tiny model's run checks itself against one process
    grep -q "^exact: .*logits identical, greedy answer identical" "$LOG/node0.log" || { echo "not exact"; exit 1; }
fi
echo "two nodes x $NPROC processes over 10.77.0.0/24: ok"
