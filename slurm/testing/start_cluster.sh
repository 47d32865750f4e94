#!/bin/bash
# Start a real two-node SLURM cluster on this one machine, for the tests (root; Debian's packages).
# Installs slurmctld, slurmd, slurm-client and munge if missing. Nodes n1 and n2 are two slurmd on
# 127.0.0.1 (distinct ports), CPUS_PER_NODE CPUs each (default 2), one partition "debug".
# Exit status 3 with a one-line reason when this machine cannot run SLURM (not root, no packages).
# State, logs and the config live in FDPG_SLURM_DIR (default /tmp/fdpg-slurm); /etc/slurm/slurm.conf
# points there. Stop with stop_cluster.sh.
set -euo pipefail
DIR="${FDPG_SLURM_DIR:-/tmp/fdpg-slurm}"
CPUS="${CPUS_PER_NODE:-2}"
cannot() { echo "start_cluster: cannot run SLURM here: $*" >&2; exit 3; }
[ "$(id -u)" = 0 ] || cannot "not root"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "slurm is not installed and there is no apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; } \
        >"/tmp/fdpg-slurm-install.log" 2>&1 || cannot "apt-get install failed (see /tmp/fdpg-slurm-install.log)"
fi
# a cluster left over from an earlier run is stopped first (its daemons hold the ports)
bash "$(dirname "$0")/stop_cluster.sh" >/dev/null
mkdir -p "$DIR/state" "$DIR/spool-n1" "$DIR/spool-n2" /etc/slurm
# munge: a key, a socket dir, the daemon as user munge (no systemd here)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
# started here: remembered so that stop_cluster.sh stops it (a munged that was already running is left alone)
if ! munge -n >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; touch "$DIR/munged.started"; sleep 0.5; fi
munge -n | unmunge >/dev/null || cannot "munged does not answer"
grep -q "fdpg-slurm-test" /etc/hosts || echo "127.0.0.1 n1 n2 # fdpg-slurm-test" >> /etc/hosts
cat > /etc/slurm/slurm.conf <<CONF
# Written by fdpg-scale slurm/testing/start_cluster.sh: a test cluster on one machine.
ClusterName=fdpgtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job would otherwise wait 120 s for the old credential to expire
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/slurmctld -c -i
/usr/sbin/slurmd -N n1
/usr/sbin/slurmd -N n2
for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c idle)" = 2 ]; then echo "start_cluster: n1, n2 idle"; exit 0; fi
    sleep 0.5
done
cannot "nodes did not become idle: $(sinfo -N 2>&1 | tr '\n' ' ') (logs in $DIR)"
