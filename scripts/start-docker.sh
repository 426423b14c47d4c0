#!/usr/bin/env bash
# Starts the Docker engine unless it is running, the way Lambent's machines run it: no bridge,
# no address and no iptables rules, since every sandbox container has network "none".
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "the Docker engine is not running; start it as root" >&2
    exit 1
fi

log=/var/log/lambent-dockerd.log
echo "starting dockerd (log: $log)" >&2
setsid nohup dockerd --iptables=false --bridge=none --ip-masq=false >>"$log" 2>&1 </dev/null &
for _ in $(seq 300); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "dockerd did not answer within 30 s; see $log" >&2
exit 1
