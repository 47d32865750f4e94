#!/bin/bash
# Stop the test cluster started by start_cluster.sh: its jobs, slurmd n1/n2, slurmctld (by pid file) and
# munged if start_cluster.sh started it.
DIR="${FDPG_SLURM_DIR:-/tmp/fdpg-slurm}"
scancel --user "$(id -un)" >/dev/null 2>&1 || true
for f in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid; do
    [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
done
# a slurmd that never registered has written no pid file: find it by its exact command line
for node in n1 n2; do
    for pid in $(pgrep -x -f "/usr/sbin/slurmd -N $node" || true); do kill "$pid" 2>/dev/null || true; done
done
for f in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid; do
    for _ in $(seq 1 20); do [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.25; done
done
# a slurmd still retrying its registration can ignore SIGTERM
for node in n1 n2; do
    for pid in $(pgrep -x -f "/usr/sbin/slurmd -N $node" || true); do kill -KILL "$pid" 2>/dev/null || true; done
done
if [ -e "$DIR/munged.started" ] && [ -s /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    rm -f "$DIR/munged.started"
fi
echo "stop_cluster: stopped"
