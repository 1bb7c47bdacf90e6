#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine, for tests and CI (root, Debian 12).
#
#   slurm/local_cluster.sh up [N] [--no-accounting]
#                                   start N nodes (default 4); idempotent; cleans a crashed cluster first
#                                   (N above 8: light nodes for a large simulated cluster, see light_shape);
#                                   with accounting (slurmdbd on a private MariaDB, so `sacct` answers) unless
#                                   --no-accounting or GL_ACCOUNTING=0 (a cluster without slurmdbd, as some sites)
#                                   GL_MEMORY=consumable: memory is a consumable resource (CR_Core_Memory)
#   slurm/local_cluster.sh down     stop everything, remove namespaces, veths and bridge; idempotent
#   slurm/local_cluster.sh down --all   the same for every instance that has a folder beside this one
#   slurm/local_cluster.sh status   sinfo and daemon liveness; exit 0 if up, 1 if not
#   slurm/local_cluster.sh env      eval "$(slurm/local_cluster.sh env)" to use sbatch/srun/... from a shell
#   slurm/local_cluster.sh describe this instance's names, one KEY=VALUE a line (for tests)
#   slurm/local_cluster.sh start-node gl-nI   start that node's slurmd again if it is not running (tests that
#                                   kill one to play a lost node)
#   slurm/local_cluster.sh preempt partition_prio|qos   restart slurmctld with that PreemptType (jobs and the
#                                   queue survive it): partitions in priority tiers (the default), or QOS (needs
#                                   accounting; the QOS low, lowcancel and urgent mirror the partitions)
#   slurm/local_cluster.sh memory cap|consumable   every daemon again with memory a per-node cap (CR_Core, the
#                                   default) or a consumable resource (CR_Core_Memory); only while no job runs
#   slurm/local_cluster.sh proctrack linuxproc|cgroup   every daemon again with ProctrackType=proctrack/linuxproc
#                                   (the default) or proctrack/cgroup (cgroup v1's freezer, each node a folder of
#                                   its own in the host's hierarchy, removed at down); only while no job runs
#   slurm/local_cluster.sh min-job-age SECONDS   how long slurmctld keeps a finished job (3600 at `up`; Slurm's
#                                   default is 300): past it only accounting knows the job
#
# Layout: slurmctld (and munged, slurmdbd, mariadbd) on the host at 10.77.0.1 on bridge gl-br0; node i is network namespace
# gl-n<i> at 10.77.0.<10+i>, with its own hostname (UTS namespace) and a private /etc/hosts (mount
# namespace) that names the controller and every node.  All client commands run on the host with
# SLURM_CONF pointing at the generated config.  Each node has GL_CPUS_PER_NODE CPUs (4) and GL_GPUS_PER_NODE GPUs
# (4) as a generic resource: character devices in the cluster's folder, which Slurm allocates, binds and shows to
# tasks in CUDA_VISIBLE_DEVICES as real ones (nothing runs CUDA).  Everything generated lives in
# $GPTLAUNCH_CLUSTER_DIR (default <repo>/slurm/.cluster).  Besides root, the cluster has a second user, gl-other
# (made once per machine), whose jobs run beside root's as another user's do at a site.  Facts behind the choices:
# /work/shared/reference/slurm-local-cluster.md and slurm-gpus-as-gres.md.
#
# Instances: GPTLAUNCH_CLUSTER_INSTANCE=K (1..99; default 0, the cluster above) selects another cluster that
# runs beside the others, with nothing in common: bridge gl-brK, nodes glK-n<i>, veths glK-v<i>, subnet
# 10.77.K.0/24, its own ports, munged, database and folder ($GPTLAUNCH_CLUSTER_DIR-K).  Parallel test workers each
# use their own.  Every command acts on the selected instance only, except `down --all`.
set -euo pipefail
umask 077  # the cluster's state, keys and logs are root's alone; open_to_users opens what a site's users read

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INSTANCE="${GPTLAUNCH_CLUSTER_INSTANCE:-0}"
[[ "$INSTANCE" =~ ^[0-9]+$ ]] && [ "$INSTANCE" -le 99 ] ||
  { echo "local_cluster: error: GPTLAUNCH_CLUSTER_INSTANCE must be 0..99, got '$INSTANCE'" >&2; exit 2; }
INSTANCE=$((10#$INSTANCE))
BASE_DIR="${GPTLAUNCH_CLUSTER_DIR:-$REPO/slurm/.cluster}"
SUBNET=10.77.$INSTANCE
CTL_ADDR=$SUBNET.1
BRIDGE=gl-br$INSTANCE
# Linux limits interface names to 15 characters: glK-v<i> stays within it for K <= 99 and i <= 200.
if [ "$INSTANCE" = 0 ]; then
  CDIR="$BASE_DIR"
  NS_PREFIX=gl-n        # namespace == node name == hostname: gl-n1, gl-n2, ...
  VETH_PREFIX=gl-v      # host side of node i's veth: gl-v1, ...
  CLUSTER_NAME=gptlaunch
else
  CDIR="$BASE_DIR-$INSTANCE"
  NS_PREFIX=gl$INSTANCE-n
  VETH_PREFIX=gl$INSTANCE-v
  CLUSTER_NAME=gptlaunch$INSTANCE
fi
CONF="$CDIR/slurm.conf"
STATE_FILE="$CDIR/cluster.env"
# proctrack/cgroup (`proctrack cgroup`): each node a folder of its own in the host's cgroup-v1 freezer hierarchy
HOST_FREEZER=/sys/fs/cgroup/freezer
# Not Slurm's default 6817, so a system slurmctld on this host cannot clash; two ports per instance (slurmctld
# listens on every address of the host).
CTL_PORT=$((6917 + 2 * INSTANCE))
SLURMD_PORT=$((CTL_PORT + 1))
# Accounting: slurmdbd and its MariaDB, two more ports per instance above every instance's slurmctld ports (7115).
DBD_PORT=$((7119 + 2 * INSTANCE))
DB_PORT=$((DBD_PORT + 1))
# MariaDB's empty data folder, made once per machine by mariadb-install-db (4-7 s) and copied by every start.
DB_TEMPLATE="$BASE_DIR-mariadb/db"
# More CPUs than this machine has (SlurmdParameters=config_overrides): a GPU job can then ask for 2 tasks per
# node with --cpus-per-task=2, as GPU ranks do.  Jobs that ask for nothing still get 1 CPU per task.
CPUS_PER_NODE="${GL_CPUS_PER_NODE:-4}"
# GPUs as a generic resource: Slurm allocates them and sets each task's CUDA_VISIBLE_DEVICES as on a GPU
# cluster; the "GPUs" are character devices made in the cluster's folder (nothing runs CUDA on them).
GPUS_PER_NODE="${GL_GPUS_PER_NODE:-4}"
UP_TIMEOUT="${GL_UP_TIMEOUT:-60}"
# Seconds a preempted job of the low tiers has between Slurm's SIGTERM and its kill (docs/slurm.md: above the
# measured save time).
GRACE_S="${GL_GRACE_S:-20}"
REAL_MEMORY=8000
# Memory as a site may count it: GL_MEMORY=cap (the default) makes RealMemory only a per-node cap (CR_Core);
# GL_MEMORY=consumable makes it a resource jobs and steps hold like CPUs (CR_Core_Memory), as most sites do.
case "${GL_MEMORY:-cap}" in
  cap) SELECT_PARAMS=CR_Core ;;
  consumable) SELECT_PARAMS=CR_Core_Memory ;;
  *) echo "local_cluster: error: GL_MEMORY must be cap or consumable, got '$GL_MEMORY'" >&2; exit 2 ;;
esac
# A large simulated cluster (`up N` with N above GL_LIGHT_ABOVE, 8): light nodes, so that tens of slurmd fit on
# one small machine: 2 CPUs and 512 MB declared, 1 fake GPU, slurmd logging errors only, and glibc limited to
# one malloc arena (each of slurmd's short-lived message threads otherwise keeps its own). The 4-node cluster
# of CI is unchanged.
LIGHT_ABOVE="${GL_LIGHT_ABOVE:-8}"
light_shape() {  # light_shape N: the light node shape for an N-node cluster
  [ "$1" -gt "$LIGHT_ABOVE" ] || return 0
  CPUS_PER_NODE="${GL_CPUS_PER_NODE:-2}"
  GPUS_PER_NODE="${GL_GPUS_PER_NODE:-1}"
  REAL_MEMORY=512
  SLURMD_DEBUG=error
  UP_TIMEOUT="${GL_UP_TIMEOUT:-$((60 + 2 * $1))}"
}
SLURMD_DEBUG=info
# Auth: munge, with a private munged (own key, socket, pid file) rather than auth/none.  auth/none would
# let anyone who can reach slurmctld's port (it listens on every interface of the host) run commands as
# root; munge costs one daemon and ~0.1 s.  The socket lives in /run (short path: unix sockets are limited
# to 108 bytes, and munged insists on root- or munge-owned, non-world-writable directories).
MUNGE_DIR="/run/gptlaunch-munge-$(printf '%s' "$CDIR" | cksum | cut -d' ' -f1)"
DB_SOCKET="$MUNGE_DIR/mysqld.sock"  # MariaDB's socket: a short path too (a path under $CDIR may exceed 108 bytes)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export SLURM_CONF="$CONF"

LABEL=local_cluster; [ "$INSTANCE" = 0 ] || LABEL="local_cluster[$INSTANCE]"
log() { echo "$LABEL: $*"; }
die() { echo "$LABEL: error: $*" >&2; exit 1; }
me() {  # how to run this script for this instance, for hints in messages
  if [ "$INSTANCE" = 0 ]; then echo "$1"; else echo "GPTLAUNCH_CLUSTER_INSTANCE=$INSTANCE $1"; fi
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- processes: by pid file only, and only if the pid still runs the program we started ---------------
# (a zombie counts as dead: where pid 1 does not reap, a killed daemon lingers as one)
running() {  # running PID: exists and is not a zombie (pure bash: called in tight loops)
  local stat
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  # (`read <`, not `$(< file)`: with set -e bash 5.2 exits on a failed `$(< file)` even behind ||)
  { read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ]
}
alive() {  # alive PID NAME: running, and running NAME (not a recycled pid)
  local comm
  running "$1" && { read -r comm < "/proc/$1/comm"; } 2>/dev/null && [ "$comm" = "$2" ]
}
pidof_file() { cat "$1" 2>/dev/null || true; }
stop_pids() {  # stop_pids NAME PID...: TERM, wait up to 6 s (KillWait is 5), then KILL
  local name="$1"; shift
  local pid left i
  for pid in "$@"; do alive "$pid" "$name" && kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 60); do
    left=0
    for pid in "$@"; do alive "$pid" "$name" && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  for pid in "$@"; do alive "$pid" "$name" && kill -KILL "$pid" 2>/dev/null || true; done
}
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}[0-9]+$" || true; }
our_links() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^(${VETH_PREFIX}[0-9]+|$BRIDGE)$" || true; }

# --- one folder per instance: the names (namespaces, bridge, ports) are the machine's, so a second checkout
# that runs the same instance must not take them over (its `up` would first clean "stale" namespaces that
# are another cluster's live nodes).  The folder that started the instance is written in /run.
OWNER_FILE="/run/gptlaunch-cluster-$INSTANCE.owner"
foreign_owner() {  # prints the other folder whose cluster holds this instance and still runs; 1 if none
  local other
  other="$(cat "$OWNER_FILE" 2>/dev/null || true)"
  [ -n "$other" ] && [ "$other" != "$CDIR" ] && alive "$(pidof_file "$other/run/slurmctld.pid")" slurmctld &&
    echo "$other"
}
not_foreign() {  # not_foreign WHAT: die if another folder's cluster holds this instance
  local other
  other="$(foreign_owner)" || return 0
  die "cannot $1: instance $INSTANCE is the running cluster of $other; stop it from there, or choose another" \
    "GPTLAUNCH_CLUSTER_INSTANCE"
}

# The folder comes from an environment variable: as root, source nothing from it unless it is ours and no one
# else could have written it (a file planted there would run as root).
trusted() {  # trusted PATH...: each owned by us and writable by neither group nor others
  local p
  for p in "$@"; do
    [ "$(stat -c %u "$p")" = "$(id -u)" ] && [ $((0$(stat -c %a "$p") & 022)) -eq 0 ] || return 1
  done
}
nodes_from_state() {  # the node count of the running cluster (0 if none)
  [ -f "$STATE_FILE" ] || { echo 0; return; }
  trusted "$CDIR" "$STATE_FILE" ||
    die "$STATE_FILE: not sourced: it and $CDIR must be owned by $(id -un) and writable by no one else"
  . "$STATE_FILE" && echo "${NODES:-0}"
}
ACCOUNTING="${GL_ACCOUNTING:-1}"
[[ "$ACCOUNTING" =~ ^[01]$ ]] || die "GL_ACCOUNTING must be 0 or 1, got '$ACCOUNTING'"
accounting_from_state() {  # ACCOUNTING of the running cluster (1 when unknown)
  ACCOUNTING=1
  [ -f "$STATE_FILE" ] && trusted "$CDIR" "$STATE_FILE" && ACCOUNTING="$(. "$STATE_FILE" && echo "${ACCOUNTING:-1}")"
  return 0
}

# --- iptables: with br_netfilter loaded and a FORWARD policy of DROP (Docker sets one), traffic between
# two namespaces on the bridge is dropped.  Accept bridge-internal traffic explicitly while we are up.
FWD_RULE=(FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT)
fw_open() {
  [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo 0)" = 1 ] || return 0
  command -v iptables >/dev/null 2>&1 || return 0
  iptables -C "${FWD_RULE[@]}" 2>/dev/null || iptables -I "${FWD_RULE[@]}" 2>/dev/null ||
    log "warning: could not add iptables rule '${FWD_RULE[*]}'; node-to-node traffic may be dropped"
}
fw_close() {
  command -v iptables >/dev/null 2>&1 || return 0
  while iptables -C "${FWD_RULE[@]}" 2>/dev/null; do iptables -D "${FWD_RULE[@]}" 2>/dev/null || break; done
}

# --- down ------------------------------------------------------------------------------------------------
do_down() {
  local ns pid nodepids=() nspids=() link
  stop_pids slurmctld "$(pidof_file "$CDIR/run/slurmctld.pid")"
  stop_pids slurmdbd "$(pidof_file "$CDIR/run/slurmdbd.pid")" &  # in parallel with the nodes' stop
  stop_pids mariadbd "$(pidof_file "$CDIR/run/mariadbd.pid")" &
  for f in "$CDIR"/run/slurmd-*.pid; do [ -e "$f" ] && nodepids+=("$(pidof_file "$f")"); done
  [ ${#nodepids[@]} -gt 0 ] && stop_pids slurmd "${nodepids[@]}"
  # Whatever still runs in a node (slurmstepd and job tasks outlive slurmd; their controller is gone):
  # TERM, 1 s of grace, then KILL, by pid.
  for ns in $(our_namespaces); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do nspids+=("$pid"); done
  done
  if [ ${#nspids[@]} -gt 0 ]; then
    for pid in "${nspids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 10); do
      local left=0
      for pid in "${nspids[@]}"; do running "$pid" && { left=1; break; }; done
      [ $left = 0 ] && break
      sleep 0.1
    done
    for pid in "${nspids[@]}"; do running "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  fi
  wait  # slurmdbd and mariadbd (munged stops last: slurmdbd needs it to the end)
  stop_pids munged "$(pidof_file "$MUNGE_DIR/munged.pid")"
  for ns in $(our_namespaces); do ip netns delete "$ns" 2>/dev/null || true; done
  # proctrack/cgroup's folders, deepest first (a cgroup goes once its processes have)
  for f in "$HOST_FREEZER/$CLUSTER_NAME-$NS_PREFIX"*; do
    [ -d "$f" ] && find "$f" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  for link in $(our_links); do ip link delete "$link" 2>/dev/null || true; done
  fw_close
  rm -rf "$MUNGE_DIR" "$CDIR/run" "$STATE_FILE"
  [ "$(cat "$OWNER_FILE" 2>/dev/null)" != "$CDIR" ] || rm -f "$OWNER_FILE"
}

# --- up --------------------------------------------------------------------------------------------------
is_up() {  # is_up N: every piece of an N-node cluster is alive
  local n="$1" i
  [ "$n" -gt 0 ] || return 1
  alive "$(pidof_file "$MUNGE_DIR/munged.pid")" munged || return 1
  alive "$(pidof_file "$CDIR/run/slurmctld.pid")" slurmctld || return 1
  if [ "$ACCOUNTING" = 1 ]; then
    alive "$(pidof_file "$CDIR/run/mariadbd.pid")" mariadbd && alive "$(pidof_file "$CDIR/run/slurmdbd.pid")" slurmdbd ||
      return 1
  fi
  for i in $(seq "$n"); do
    alive "$(pidof_file "$CDIR/run/slurmd-$NS_PREFIX$i.pid")" slurmd || return 1
  done
}
anything_left() {
  [ -f "$STATE_FILE" ] || [ -n "$(our_namespaces)" ] || [ -n "$(our_links)" ] ||
    compgen -G "$CDIR/run/*.pid" >/dev/null || [ -e "$MUNGE_DIR" ]
}

accounting_conf() {  # slurm.conf's accounting lines
  if [ "$ACCOUNTING" = 1 ]; then
    printf '%s\n' "AccountingStorageType=accounting_storage/slurmdbd" "AccountingStorageHost=$CTL_ADDR" \
      "AccountingStoragePort=$DBD_PORT" "AccountingStoragePass=$MUNGE_DIR/munge.socket"  # (munge's socket, for slurmdbd)
  else  # no slurmdbd: sacct exits 1 ("Slurm accounting storage is disabled"); scontrol keeps jobs MinJobAge
    echo "AccountingStorageType=accounting_storage/none"
  fi
  # No per-task usage sampling (jobacct_gather/linux reads /proc every 30 s): states, times and exit codes only.
  echo "JobAcctGatherType=jobacct_gather/none"
}

write_conf() {
  local n="$1" ctl i
  ctl="$(hostname -s)"  # slurmctld refuses to start unless SlurmctldHost names this host's short name
  cat > "$CONF" <<EOF
# Generated by slurm/local_cluster.sh up $n: do not edit (regenerated on every up).
ClusterName=$CLUSTER_NAME
SlurmctldHost=$ctl($CTL_ADDR)
SlurmctldPort=$CTL_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after 6 s instead of 121 s
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=5
StateSaveLocation=$CDIR/state
SlurmdSpoolDir=$CDIR/spool/%n
SlurmctldPidFile=$CDIR/run/slurmctld.pid
SlurmdPidFile=$CDIR/run/slurmd-%n.pid
SlurmctldLogFile=$CDIR/log/slurmctld.log
SlurmdLogFile=$CDIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=$SLURMD_DEBUG
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$(accounting_conf)
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=$SELECT_PARAMS
GresTypes=gpu
# Trust the node lines below even where this machine has fewer cores or less memory (no DRAIN).
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
Waittime=0
# Finished jobs stay visible to scontrol for an hour (a cluster without accounting has nothing else).
MinJobAge=3600
SchedulerParameters=sched_interval=1,bf_interval=1
MailProg=/bin/true
# Under CR_Core RealMemory is only a per-node cap (--mem up to it is accepted); under CR_Core_Memory it is held.
EOF
  for i in $(seq "$n"); do
    echo "NodeName=$NS_PREFIX$i NodeAddr=$SUBNET.$((10 + i)) NodeHostname=$NS_PREFIX$i CPUs=$CPUS_PER_NODE Sockets=1 CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$REAL_MEMORY Gres=gpu:$GPUS_PER_NODE State=UNKNOWN" >> "$CONF"
  done
  cat >> "$CONF" <<EOF
# Preemption as sites configure it: partitions on the same nodes in priority tiers. A job of \`urgent\` that needs
# the nodes preempts the jobs of \`low\` (SIGTERM, GraceTime seconds, then killed and requeued by Slurm) and of
# \`lowcancel\` (the same, then cancelled). Jobs of \`debug\`, the default, are never preempted. The other way
# (\`preempt qos\`): the QOS of the same names do the same, whatever the partition.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=08:00:00 DefaultTime=01:00:00 State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=ALL MaxTime=08:00:00 DefaultTime=01:00:00 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=lowcancel Nodes=ALL MaxTime=08:00:00 DefaultTime=01:00:00 State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=$GRACE_S
PartitionName=urgent Nodes=ALL MaxTime=08:00:00 DefaultTime=01:00:00 State=UP PriorityTier=10 PreemptMode=OFF
EOF

  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$CTL_ADDR $ctl"
    for i in $(seq "$n"); do echo "$SUBNET.$((10 + i)) $NS_PREFIX$i"; done
  } > "$CDIR/hosts"
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$CDIR/resolv.conf"
  write_gres "$n"
  # See start_slurmd: nodes get an empty tmpfs on /sys/fs/cgroup, which only the v1 plugin accepts.
  echo "CgroupPlugin=cgroup/v1" > "$CDIR/cgroup.conf"
  open_to_users
}

# What every user of a site can read, as there: the configuration the client commands and the nodes read, the
# (fake) GPU device files, whose use Slurm grants, and the spool where a job's script runs as its user. The state,
# logs, database and slurmdbd.conf (its password) stay root's.
open_to_users() {
  chmod 711 "$CDIR"
  chmod 644 "$CONF" "$CDIR/gres.conf" "$CDIR/cgroup.conf" "$CDIR/hosts" "$CDIR/resolv.conf"
  chmod 755 "$CDIR/dev"
  chmod 666 "$CDIR"/dev/gpu*
}

# A second user of the cluster (a system account without a home or login shell), for tests of two users' jobs
# side by side. Made once per machine; the lock keeps instances starting together from racing on /etc/passwd.
OTHER_USER=gl-other
ensure_other_user() {
  id -u "$OTHER_USER" >/dev/null 2>&1 && return 0
  ( flock -w 60 7 || die "another start holds /run/gptlaunch-users.lock for over 60 s"
    id -u "$OTHER_USER" >/dev/null 2>&1 ||
      useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        "$OTHER_USER" || die "could not add the user $OTHER_USER"
  ) 7>/run/gptlaunch-users.lock
}

write_gres() {  # the fake GPUs: one character device each (distinct minors of /dev/null's driver), and gres.conf
  local minors=(3 5 7 8 9 11) i files=()
  [[ "$GPUS_PER_NODE" =~ ^[1-9]$ ]] && [ "$GPUS_PER_NODE" -le ${#minors[@]} ] ||
    die "GL_GPUS_PER_NODE must be 1..${#minors[@]}, got '$GPUS_PER_NODE'"
  rm -rf "$CDIR/dev"
  mkdir -p "$CDIR/dev"
  for i in $(seq 0 $((GPUS_PER_NODE - 1))); do
    mknod "$CDIR/dev/gpu$i" c 1 "${minors[$i]}"
    files+=("$CDIR/dev/gpu$i")
  done
  {
    echo "# Generated by slurm/local_cluster.sh: fake GPUs, so that jobs get GPUs and CUDA_VISIBLE_DEVICES from Slurm."
    echo "AutoDetect=off"
    for f in "${files[@]}"; do echo "Name=gpu File=$f"; done
  } > "$CDIR/gres.conf"
}

start_munged() {
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"   # munged wants the socket's directory executable by all
  ( umask 077; head -c 1024 /dev/urandom > "$MUNGE_DIR/munge.key" )
  chown munge:munge "$MUNGE_DIR/munge.key"
  # munged must run as the munge user (as root it refuses /var/lib/munge's ownership); it daemonizes.
  runuser -u munge -- munged --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
    --log-file="$MUNGE_DIR/munged.log" </dev/null >>"$CDIR/log/munged.out" 2>&1 9>&- ||
    { cat "$MUNGE_DIR/munged.log" >&2 2>/dev/null; die "munged did not start"; }
}

# --- accounting: slurmdbd on a private MariaDB (facts: /work/shared/reference/slurm-preemption-and-accounting.md)
db_template() {  # the empty data folder every start copies; made once, under a lock, moved into place whole
  [ -d "$DB_TEMPLATE" ] && return 0
  mkdir -p "${DB_TEMPLATE%/*}"
  ( flock -w 120 8 || die "another start holds ${DB_TEMPLATE%/*}/.lock for over 120 s"
    [ -d "$DB_TEMPLATE" ] && exit 0
    rm -rf "$DB_TEMPLATE.tmp"
    mariadb-install-db --user=root --datadir="$DB_TEMPLATE.tmp" --auth-root-authentication-method=normal \
      --skip-test-db --skip-name-resolve >"$CDIR/log/mariadb-install.out" 2>&1 ||
      { tail -n 20 "$CDIR/log/mariadb-install.out" >&2; die "mariadb-install-db failed"; }
    mv "$DB_TEMPLATE.tmp" "$DB_TEMPLATE" ) 8>"${DB_TEMPLATE%/*}/.lock"
}

start_db() {  # mariadbd on 127.0.0.1:DB_PORT, as root (the cluster's folder is root's alone), data in $CDIR/db
  db_template
  rm -rf "$CDIR/db"
  cp -a "$DB_TEMPLATE" "$CDIR/db"
  # A test database: no durability (flushes), a small buffer pool; performance_schema off saves ~100 MB.
  # mariadbd creates its files by UMASK and UMASK_DIR (0660, 0700), not the shell's umask: the folder is root's alone.
  UMASK=0600 UMASK_DIR=0700 setsid mariadbd --no-defaults --user=root --datadir="$CDIR/db" --socket="$DB_SOCKET" \
    --pid-file="$CDIR/run/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --log-error="$CDIR/log/mariadbd.log" --performance-schema=off --innodb-buffer-pool-size=32M \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-flush-method=nosync \
    </dev/null >>"$CDIR/log/mariadbd.out" 2>&1 9>&- &
}

write_dbd_conf() {  # slurmdbd.conf beside slurm.conf (slurmdbd looks there), 600: it holds the password
  local pass
  pass="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  ( umask 077; cat > "$CDIR/slurmdbd.conf" <<EOF
# Generated by slurm/local_cluster.sh up: do not edit (regenerated on every up).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
DbdHost=$(hostname -s)
DbdAddr=$CTL_ADDR
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$CDIR/run/slurmdbd.pid
LogFile=$CDIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
  )
  echo "$pass"
}

poll() {  # poll WHAT SECONDS CMD...: run CMD every 0.05 s until it succeeds; die after SECONDS
  local what="$1" limit="$2" t0; shift 2
  t0=$(now)
  until "$@" >/dev/null 2>&1; do
    [ "$(elapsed "$t0" | cut -d. -f1)" -lt "$limit" ] || { show_logs; die "$what did not answer within $limit s"; }
    sleep 0.05
  done
}

start_accounting() {  # after start_db: the user slurmdbd logs in as, then slurmdbd
  local pass
  pass="$(write_dbd_conf)"
  poll "mariadbd" 60 mariadb --no-defaults --socket="$DB_SOCKET" -e "select 1"
  mariadb --no-defaults --socket="$DB_SOCKET" -e "
    create user 'slurm'@'127.0.0.1' identified by '$pass'; create user 'slurm'@'localhost' identified by '$pass';
    grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1'; grant all on slurm_acct_db.* to 'slurm'@'localhost';" ||
    die "could not create the database user of slurmdbd"
  setsid slurmdbd -D </dev/null >>"$CDIR/log/slurmdbd.out" 2>&1 9>&- &
  # slurmctld registers the cluster with slurmdbd itself when it starts (no `sacctmgr add cluster`)
  poll "slurmdbd" 60 sacctmgr -i list cluster
  # The QOS of preempt/qos, before slurmctld reads them: urgent preempts low (requeued) and lowcancel (cancelled)
  sacctmgr -i add qos low,lowcancel GraceTime="$GRACE_S" >/dev/null &&
    sacctmgr -i modify qos where name=low set PreemptMode=requeue >/dev/null &&
    sacctmgr -i modify qos where name=lowcancel set PreemptMode=cancel >/dev/null &&
    sacctmgr -i add qos urgent Priority=10 Preempt=low,lowcancel >/dev/null || die "could not add the QOS"
}

do_preempt() {  # do_preempt TYPE: slurmctld again with PreemptType=preempt/TYPE (its saved state keeps the jobs)
  local type="$1" pid
  [[ "$type" =~ ^(partition_prio|qos)$ ]] || die "preempt: partition_prio or qos, got '$type'"
  is_up "$(nodes_from_state)" || die "preempt: the cluster is not up"
  accounting_from_state
  [ "$type" = partition_prio ] || [ "$ACCOUNTING" = 1 ] || die "preempt qos: needs accounting (the QOS live in slurmdbd)"
  sed -i "s|^PreemptType=.*|PreemptType=preempt/$type|" "$CONF"
  pid="$(pidof_file "$CDIR/run/slurmctld.pid")"
  stop_pids slurmctld "$pid"
  setsid slurmctld -D </dev/null >>"$CDIR/log/slurmctld.out" 2>&1 9>&- &
  poll "slurmctld" 60 scontrol ping
  # the nodes register again within a few seconds; until then the controller knows no state of theirs
  poll "the nodes' registration" 60 bash -c "! sinfo -h -N -o '%T' | grep -q unknown"
  log "PreemptType=preempt/$type"
}

do_memory() {  # do_memory cap|consumable: every daemon again with memory a cap (CR_Core) or held (CR_Core_Memory)
  local how="$1" params pids=() f node
  case "$how" in cap) params=CR_Core ;; consumable) params=CR_Core_Memory ;;
    *) die "memory: cap or consumable, got '$how'" ;; esac
  accounting_from_state
  is_up "$(nodes_from_state)" || die "memory: the cluster is not up"
  [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i)" ] || die "memory: jobs run (Slurm's select plugin changes only between them)"
  sed -i "s|^SelectTypeParameters=.*|SelectTypeParameters=$params|" "$CONF"
  # slurmctld and every slurmd read it at their start only
  stop_pids slurmctld "$(pidof_file "$CDIR/run/slurmctld.pid")"
  for f in "$CDIR"/run/slurmd-*.pid; do [ -e "$f" ] && pids+=("$(pidof_file "$f")"); done
  [ ${#pids[@]} -eq 0 ] || stop_pids slurmd "${pids[@]}"
  setsid slurmctld -D </dev/null >>"$CDIR/log/slurmctld.out" 2>&1 9>&- &
  poll "slurmctld" 60 scontrol ping
  light_shape "$(nodes_from_state)"
  for node in $(our_namespaces); do start_slurmd "$node"; done
  poll "the nodes' registration" 60 bash -c "! sinfo -h -N -o '%T' | grep -qvx idle"
  log "SelectTypeParameters=$params"
}

do_proctrack() {  # do_proctrack linuxproc|cgroup: every daemon again with that ProctrackType
  local how="$1" pids=() f node
  case "$how" in linuxproc|cgroup) ;; *) die "proctrack: linuxproc or cgroup, got '$how'" ;; esac
  is_up "$(nodes_from_state)" || die "proctrack: the cluster is not up"
  [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i)" ] || die "proctrack: jobs run"
  sed -i "s|^ProctrackType=.*|ProctrackType=proctrack/$how|" "$CONF"
  stop_pids slurmctld "$(pidof_file "$CDIR/run/slurmctld.pid")"
  for f in "$CDIR"/run/slurmd-*.pid; do [ -e "$f" ] && pids+=("$(pidof_file "$f")"); done
  [ ${#pids[@]} -eq 0 ] || stop_pids slurmd "${pids[@]}"
  setsid slurmctld -D </dev/null >>"$CDIR/log/slurmctld.out" 2>&1 9>&- &
  poll "slurmctld" 60 scontrol ping
  light_shape "$(nodes_from_state)"
  for node in $(our_namespaces); do start_slurmd "$node"; done
  poll "the nodes' registration" 60 bash -c "! sinfo -h -N -o '%T' | grep -qvx idle"
  log "ProctrackType=proctrack/$how"
}

do_min_job_age() {  # do_min_job_age SECONDS: how long slurmctld keeps a finished job's record (Slurm's default: 300)
  local seconds="$1"
  [[ "$seconds" =~ ^[0-9]+$ ]] || die "min-job-age: a number of seconds, got '$seconds'"
  is_up "$(nodes_from_state)" || die "min-job-age: the cluster is not up"
  sed -i "s|^MinJobAge=.*|MinJobAge=$seconds|" "$CONF"
  scontrol reconfigure >/dev/null || die "min-job-age: scontrol reconfigure failed"
  log "MinJobAge=$seconds"
}

make_network() {
  local n="$1" i ns veth
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$n"); do
    ns="$NS_PREFIX$i"; veth="$VETH_PREFIX$i"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$CTL_ADDR"
  done
  fw_open
}

start_slurmd() {  # start_slurmd NODE
  local node="$1"
  mkdir -p -m 755 "$CDIR/spool/$node"
  # nsenter, not `ip netns exec`: the latter remounts /sys.  unshare gives the node its own hostname and
  # a private mount namespace (propagation private: nothing leaks to the host) where we bind
  #  - the cluster's hosts file on /etc/hosts (node names resolve everywhere in the cluster);
  #  - a resolv.conf pointing at the node's own loopback on /etc/resolv.conf: the nodes cannot reach any
  #    DNS server, and a name missing from the hosts file (or an IPv6 lookup: `getent hosts gl-n1`)
  #    then fails at once instead of after 10-20 s of resolver timeouts;
  #  - an empty tmpfs on /sys/fs/cgroup, with cgroup.conf forcing the cgroup/v1 plugin: slurmd 22.05
  #    always initialises a cgroup plugin and needs a filesystem there, but uses no controller with
  #    proctrack/linuxproc and task/none.  This makes nodes independent of the host's cgroup layout
  #    (autodetect fails on a cgroup2 mount in a hybrid host: "Hybrid mode is not supported", and on an
  #    empty tmpfs: "can't stat /sys/fs/cgroup/systemd/").
  setsid nsenter --net="/run/netns/$node" unshare --mount --uts sh -c "
    hostname $node &&
    mount --bind '$CDIR/hosts' /etc/hosts &&
    { mount --bind '$CDIR/resolv.conf' /etc/resolv.conf 2>/dev/null || true; } &&
    mount -t tmpfs -o size=1m,mode=755 gl-cgroup /sys/fs/cgroup &&
    $(freezer_mount "$node")
    exec env $([ "$SLURMD_DEBUG" = info ] || echo MALLOC_ARENA_MAX=1) slurmd -D -N $node" \
    </dev/null >>"$CDIR/log/slurmd-$node.out" 2>&1 9>&- &
}

freezer_mount() {  # freezer_mount NODE: under proctrack/cgroup, the commands that give the node a freezer of its own
  local own="$HOST_FREEZER/$CLUSTER_NAME-$1"
  grep -qx 'ProctrackType=proctrack/cgroup' "$CONF" || return 0
  mkdir -p "$own"
  echo "mkdir /sys/fs/cgroup/freezer && mount -t cgroup -o freezer gl-freezer /sys/fs/cgroup/freezer &&"
  echo "mount --bind '/sys/fs/cgroup/freezer/${own##*/}' /sys/fs/cgroup/freezer &&"
}

show_logs() {  # tails of the logs, without the noise every start prints
  local f lines noise='pmix|PMIx|MPI: Cannot create|state file|NOTE: Trying backup|CPU frequency'
  for f in "$CDIR/log/slurmctld.log" "$CDIR"/log/slurmd-*.log "$CDIR"/log/*.out "$MUNGE_DIR/munged.log"; do
    case "$f" in  # an .out only matters where its daemon never opened its log
      *.out) [ -s "${f%.out}.log" ] && continue ;;
      */munged.log) alive "$(pidof_file "$MUNGE_DIR/munged.pid")" munged && continue ;;
    esac
    [ -s "$f" ] || continue
    lines=6; [ "${f##*/}" = slurmctld.log ] && lines=15
    echo "----- $f (last $lines lines, start-up noise left out)" >&2
    grep -Ev "$noise" "$f" | tail -n "$lines" >&2 || true
  done
}

do_up() {
  local n="$1" t0 i have
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "up N: N must be 1..200, got '$n'"
  [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, bridge, mounts)"
  local need=(slurmctld slurmd sinfo scontrol munged ip nsenter unshare setsid runuser flock hostname useradd)
  [ "$ACCOUNTING" = 0 ] || need+=(slurmdbd sacctmgr mariadbd mariadb mariadb-install-db)
  for c in "${need[@]}"; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found: run slurm/install_deps.sh first"
  done
  light_shape "$n"
  t0=$(now)
  have="$(nodes_from_state)"
  local want="$ACCOUNTING"
  accounting_from_state
  if is_up "$have"; then
    [ "$have" = "$n" ] && [ "$ACCOUNTING" = "$want" ] ||
      die "cluster is already up with $have nodes (accounting $ACCOUNTING); run '$(me slurm/local_cluster.sh) down' first"
    grep -qx "SelectTypeParameters=$SELECT_PARAMS" "$CONF" ||
      die "cluster is already up with $(grep '^SelectTypeParameters=' "$CONF"), not $SELECT_PARAMS (GL_MEMORY); run '$(me slurm/local_cluster.sh) down' first"
    log "already up ($n nodes); SLURM_CONF=$CONF"
    sinfo
    return 0
  fi
  ACCOUNTING="$want"
  not_foreign "start $CDIR's cluster"
  if anything_left; then
    log "cleaning up a stale or partial cluster"
    do_down
  fi
  # Fresh state on every start: a crashed cluster's jobs must not come back and fail on the new nodes.
  rm -rf "$CDIR/state" "$CDIR/spool" "$CDIR/log.prev"
  [ -d "$CDIR/log" ] && mv "$CDIR/log" "$CDIR/log.prev"
  mkdir -p "$CDIR/state" "$CDIR/log" "$CDIR/run"
  mkdir -p -m 755 "$CDIR/spool"
  ensure_other_user
  write_conf "$n"
  printf 'NODES=%d\nACCOUNTING=%d\n' "$n" "$ACCOUNTING" > "$STATE_FILE"
  echo "$CDIR" > "$OWNER_FILE"
  start_munged
  # The database starts while the network is made; slurmdbd must answer before slurmctld starts.
  [ "$ACCOUNTING" = 0 ] || start_db
  make_network "$n"
  [ "$ACCOUNTING" = 0 ] || start_accounting
  setsid slurmctld -D -i </dev/null >>"$CDIR/log/slurmctld.out" 2>&1 9>&- &
  local ctl_pid=$!
  for i in $(seq "$n"); do start_slurmd "$NS_PREFIX$i"; done

  local deadline idle=0 why=""
  deadline=$(( $(date +%s) + UP_TIMEOUT ))
  while :; do
    idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
    [ "$idle" -ge "$n" ] && break
    running "$ctl_pid" || why="slurmctld exited"
    [ "$(date +%s)" -ge "$deadline" ] && why="timeout (${UP_TIMEOUT} s, GL_UP_TIMEOUT)"
    if [ -n "$why" ]; then
      echo "$LABEL: error: $why: only $idle of $n nodes idle after $(elapsed "$t0") s" >&2
      sinfo -N >&2 2>&1 || true
      show_logs
      echo "$LABEL: pieces left running for inspection; '$(me slurm/local_cluster.sh) down' removes them" >&2
      exit 1
    fi
    sleep 0.2
  done
  log "up: $n nodes idle in $(elapsed "$t0") s$([ "$ACCOUNTING" = 1 ] || echo ", no accounting"); use: eval \"\$($(me "$REPO/slurm/local_cluster.sh") env)\""
  sinfo
}

do_status() {
  local n i ok=0 pid
  n="$(nodes_from_state)"
  if [ "$n" = 0 ] && ! anything_left; then
    log "down (no cluster in $CDIR)"
    return 1
  fi
  report() {  # report LABEL PIDFILE NAME
    pid="$(pidof_file "$2")"
    if alive "$pid" "$3"; then echo "  $1: running (pid $pid)"; else echo "  $1: NOT running"; ok=1; fi
  }
  accounting_from_state
  log "$n nodes, SLURM_CONF=$CONF"
  report munged "$MUNGE_DIR/munged.pid" munged
  if [ "$ACCOUNTING" = 1 ]; then
    report mariadbd "$CDIR/run/mariadbd.pid" mariadbd
    report slurmdbd "$CDIR/run/slurmdbd.pid" slurmdbd
  else
    echo "  accounting: off (--no-accounting)"
  fi
  report slurmctld "$CDIR/run/slurmctld.pid" slurmctld
  for i in $(seq "$n"); do report "slurmd $NS_PREFIX$i" "$CDIR/run/slurmd-$NS_PREFIX$i.pid" slurmd; done
  if [ $ok = 0 ]; then
    sinfo -N -o '%N %T %c %m %G %P' || ok=1
  fi
  return $ok
}

do_env() {
  printf 'export SLURM_CONF=%q\n' "$CONF"
  # so that this script, run again from that shell, acts on the same instance
  [ "$INSTANCE" = 0 ] || printf 'export GPTLAUNCH_CLUSTER_INSTANCE=%d\n' "$INSTANCE"
}

do_describe() {  # what tests need to know of this instance's layout (names they must not hard-code)
  light_shape "$(nodes_from_state)"
  echo "INSTANCE=$INSTANCE"
  echo "DIR=$CDIR"
  echo "SLURM_CONF=$CONF"
  echo "BRIDGE=$BRIDGE"
  echo "NODE_PREFIX=$NS_PREFIX"
  echo "VETH_PREFIX=$VETH_PREFIX"
  echo "SUBNET=$SUBNET.0/24"
  echo "CONTROLLER_ADDR=$CTL_ADDR"
  echo "SLURMCTLD_PORT=$CTL_PORT"
  echo "CPUS_PER_NODE=$CPUS_PER_NODE"
  echo "GPUS_PER_NODE=$GPUS_PER_NODE"
  accounting_from_state
  echo "ACCOUNTING=$ACCOUNTING"
  echo "OTHER_USER=$OTHER_USER"
  echo "GRACE_S=$(sed -n "s/^PartitionName=low .*GraceTime=\([0-9]*\).*/\1/p" "$CONF" 2>/dev/null)"
}

down_all() {  # every instance with a folder beside the default one's, each under its own lock
  local dir k rc=0
  for dir in "$BASE_DIR" "$BASE_DIR"-*; do
    [ -d "$dir" ] || continue
    k="${dir#"$BASE_DIR"}"; k="${k#-}"
    [[ "${k:-0}" =~ ^[0-9]+$ ]] || continue
    GPTLAUNCH_CLUSTER_INSTANCE="${k:-0}" bash "${BASH_SOURCE[0]}" down || rc=1
  done
  return $rc
}

cmd="${1:-}"
# One up, down or reconfiguration of an instance at a time (parallel test workers, CI steps).  Every daemon is started
# with 9>&-: one that inherited the locked descriptor would hold the lock for as long as it runs.
hold_instance_lock() {
  exec 9>"$CDIR/.lock"
  flock -w 120 9 || die "another up/down holds $CDIR/.lock for over 120 s"
}

case "$cmd" in
  up|down)
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    if [ "$cmd" = down ] && [ "${2:-}" = --all ]; then down_all; exit; fi
    mkdir -p "$CDIR"
    hold_instance_lock
    if [ "$cmd" = up ]; then
      n=4
      for arg in "${@:2}"; do
        case "$arg" in
          --no-accounting) ACCOUNTING=0 ;;
          *) n="$arg" ;;
        esac
      done
      do_up "$n"
    else
      not_foreign "stop $CDIR's cluster"
      t0=$(now); do_down; log "down in $(elapsed "$t0") s"
    fi
    ;;
  preempt|min-job-age|memory|proctrack)  # slurmctld's configuration changed
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    [ -d "$CDIR" ] || die "no cluster here ($CDIR): start one with slurm/local_cluster.sh up"
    hold_instance_lock
    not_foreign "reconfigure $CDIR's slurmctld"
    case "$cmd" in preempt) do_preempt "${2:-}" ;; memory) do_memory "${2:-}" ;; proctrack) do_proctrack "${2:-}" ;; *) do_min_job_age "${2:-}" ;; esac
    ;;
  status) do_status ;;
  env) do_env ;;
  describe) do_describe ;;
  start-node)
    node="${2:-}"
    not_foreign "start node '$node'"
    [[ "$node" =~ ^${NS_PREFIX}[0-9]+$ ]] && [ -e "/run/netns/$node" ] || die "start-node: no node '$node'"
    alive "$(pidof_file "$CDIR/run/slurmd-$node.pid")" slurmd && { log "$node: slurmd already runs"; exit 0; }
    light_shape "$(nodes_from_state)"
    start_slurmd "$node"
    log "$node: slurmd started"
    ;;
  *) echo "usage: $0 up [N] [--no-accounting] | down [--all] | status | env | describe | start-node NODE | preempt partition_prio|qos | memory cap|consumable | proctrack linuxproc|cgroup | min-job-age SECONDS" >&2
     echo "  (GPTLAUNCH_CLUSTER_INSTANCE=K selects instance K; see the header of this script)" >&2; exit 2 ;;
esac
