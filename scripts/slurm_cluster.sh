#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for `make test-slurm` (tests/slurm/): installs Debian's
# slurm-wlm and munge, writes /etc/slurm/slurm.conf for this host (one node, partition `debug`, Default=YES,
# no accounting), and starts munged, slurmctld and slurmd: with systemd when it runs, directly otherwise
# (containers). Idempotent: run it again and it only starts what is not running, restarting the SLURM
# daemons when the configuration it writes has changed. Needs root (or passwordless sudo).
#
#   scripts/slurm_cluster.sh          install, configure, start; wait until the node is idle
#   scripts/slurm_cluster.sh stop     stop the three daemons
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm_cluster.sh: run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo -n"
fi

CONF=/etc/slurm/slurm.conf
PARTITION=${SLURM_TEST_PARTITION:-debug}
STATE=/var/lib/slurm
LOGS=/var/log/slurm

have_systemd() { [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; }

running() {  # running <pidfile>: the process it names is alive
    [ -s "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemon() {  # stop_daemon <pidfile>: until the process has exited (its pid file goes first)
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        $SUDO kill "$pid" || true
        for _ in $(seq 100); do $SUDO kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
        $SUDO kill -9 "$pid" 2>/dev/null || true
    fi
}

if [ "${1:-}" = stop ]; then
    if have_systemd; then
        $SUDO systemctl stop slurmd slurmctld munge || true
    else
        stop_daemon /run/slurmd.pid
        stop_daemon /run/slurmctld.pid
        stop_daemon /run/munge/munged.pid
    fi
    exit 0
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    echo "installing slurm-wlm and munge"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge: a key, then the daemon (as the munge user)
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mungekey --create --keyfile=/etc/munge/munge.key
fi
$SUDO chown munge:munge /etc/munge/munge.key
$SUDO chmod 400 /etc/munge/munge.key
$SUDO install -d -o munge -g munge -m 0755 /run/munge
$SUDO install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if have_systemd; then
    $SUDO systemctl start munge
elif ! running /run/munge/munged.pid; then
    $SUDO runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || { echo "slurm_cluster.sh: munge does not work" >&2; exit 1; }

# 3. slurm.conf for this host: what `slurmd -C` finds (CPUs, sockets, cores, RealMemory)
HOST=$(hostname -s)
NODE=$(slurmd -C | head -1)  # NodeName=<host> CPUs=2 Boards=1 ... RealMemory=...
case "$NODE" in NodeName=*) ;; *) echo "slurm_cluster.sh: slurmd -C said: $NODE" >&2; exit 1 ;; esac
NEW=$(mktemp)
cat >"$NEW" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster on $HOST.
ClusterName=transferlab
SlurmctldHost=$HOST
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SwitchType=switch/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerParameters=defer_batch=0
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
CHANGED=0
if ! $SUDO cmp -s "$NEW" "$CONF"; then
    $SUDO install -D -m 0644 "$NEW" "$CONF"
    CHANGED=1
fi
rm -f "$NEW"
$SUDO install -d -m 0755 "$STATE/slurmctld" "$STATE/slurmd" "$LOGS"

# 4. the SLURM daemons
if have_systemd; then
    if [ "$CHANGED" = 1 ]; then
        $SUDO systemctl restart slurmctld slurmd
    else
        $SUDO systemctl start slurmctld slurmd
    fi
else
    if [ "$CHANGED" = 1 ]; then
        stop_daemon /run/slurmd.pid
        stop_daemon /run/slurmctld.pid
    fi
    running /run/slurmctld.pid || $SUDO slurmctld
    for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    running /run/slurmd.pid || $SUDO slurmd
fi

# 5. wait until the node takes jobs
for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
        idle* | mixed* | allocated*) break ;;
        down* | drain*) $SUDO scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
case "$state" in
    idle* | mixed* | allocated*) ;;
    *)
        echo "slurm_cluster.sh: node $HOST is '${state:-unknown}'; see $LOGS/slurmctld.log and $LOGS/slurmd.log" >&2
        exit 1
        ;;
esac
sinfo
