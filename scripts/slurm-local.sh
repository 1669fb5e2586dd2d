#!/usr/bin/env bash
# A single-node SLURM on localhost, with accounting (slurmdbd + MariaDB), for tests and for trying
# `hydra/launcher=slurm` without a cluster. No systemd: every daemon is started by hand and its pid
# kept, so `down` stops only what `up` started.
#
#   scripts/slurm-local.sh up       install (apt-get, when root and missing) and start
#   scripts/slurm-local.sh down     stop the daemons this script started
#   scripts/slurm-local.sh status   sinfo + the daemons' pids
#
# State, logs and pids live in $SLURM_LOCAL_DIR (default /tmp/compresslab-slurm). The config goes to
# /etc/slurm (the Debian packages' default location), so plain `sbatch`/`sacct` find it.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/compresslab-slurm}
PIDS=$STATE/pids
CLUSTER=compresslab
CONF_DIR=/etc/slurm
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "[slurm-local] $*" >&2; }
die() { log "error: $*"; exit 1; }

wait_for() {  # wait_for <seconds> <description> <command...>
    local t=$1 what=$2; shift 2
    for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${t}s (logs in $STATE)"
}

remember() { echo "$1 $2" >> "$PIDS"; }  # remember <name> <pid>

pid_of_file() { for _ in $(seq 50); do [[ -s $1 ]] && { cat "$1"; return; }; sleep 0.1; done; die "no pid file $1"; }

install() {
    if command -v sbatch >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "SLURM is not installed and this is not root; install: apt-get install $PACKAGES"
    log "installing $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $PACKAGES >"$STATE/apt.log" 2>&1 \
        || { apt-get update -q >>"$STATE/apt.log" 2>&1 && apt-get install -y -q --no-install-recommends $PACKAGES >>"$STATE/apt.log" 2>&1; } \
        || die "apt-get install failed (see $STATE/apt.log)"
}

start_munge() {
    if pgrep -x munged >/dev/null; then log "munged already running (not ours)"; return; fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- munged
    remember munged "$(pid_of_file /run/munge/munged.pid)"
    wait_for 5 munge bash -c 'munge -n | unmunge'
}

start_mariadb() {
    if [[ -S /run/mysqld/mysqld.sock ]] && mariadb -e 'select 1' >/dev/null 2>&1; then
        log "MariaDB already running (not ours)"
    else
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb-init.log" 2>&1
        mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 --port=3306 \
            --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/compresslab.pid >"$STATE/mariadb.log" 2>&1 &
        remember mariadbd $!
        wait_for 30 MariaDB mariadb -e 'select 1'
    fi
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_conf() {
    local mem_mb cpus
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d"
    cat > "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
    cat > "$CONF_DIR/slurm.conf" <<EOF
# written by compresslab scripts/slurm-local.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

any_alive() { while read -r _ pid; do kill -0 "$pid" 2>/dev/null && return 0; done < "$PIDS"; return 1; }

up() {
    mkdir -p "$STATE"
    if [[ -s $PIDS ]]; then
        if any_alive; then log "already up ($PIDS exists); run down first"; status; return; fi
        log "stale $PIDS (none of its daemons is running, e.g. after a reboot): starting afresh"
        rm -rf "$PIDS" "$STATE/ctld" "$STATE/d"  # the dead controller's saved jobs would hold the node
    fi
    local t0=$SECONDS
    install
    : > "$PIDS"
    write_conf
    start_munge
    start_mariadb
    slurmdbd
    remember slurmdbd "$(pid_of_file "$STATE/slurmdbd.pid")"
    wait_for 20 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    slurmctld
    remember slurmctld "$(pid_of_file "$STATE/slurmctld.pid")"
    wait_for 20 slurmctld scontrol ping
    slurmd
    remember slurmd "$(pid_of_file "$STATE/slurmd.pid")"
    wait_for 20 "the node" bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
    log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %t %c cpus')"
}

down() {
    [[ -s $PIDS ]] || { log "nothing to stop ($PIDS missing)"; return; }
    # reverse start order: slurmd, slurmctld, slurmdbd, mariadbd, munged
    tac "$PIDS" | while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && log "stopped $name ($pid)"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    rm -f "$PIDS"
}

status() {
    [[ -s $PIDS ]] && cat "$PIDS" || echo "no daemons started by this script"
    command -v sinfo >/dev/null && sinfo 2>&1 || true
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
