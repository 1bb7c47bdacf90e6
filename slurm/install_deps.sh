#!/usr/bin/env bash
# Install what slurm/local_cluster.sh needs on Debian 12 (run as root, no stdin needed): Slurm, munge, and
# slurmdbd with MariaDB for accounting (no service is started: local_cluster.sh starts its own daemons).
# Idempotent: exits 0 at once when everything is already there; runs `apt-get update` only when the
# package lists are missing or too stale to install from.
set -euo pipefail

# command -> Debian package that provides it
declare -A NEED=(
  [slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [srun]=slurm-client
  [sinfo]=slurm-client [scontrol]=slurm-client [munged]=munge [ip]=iproute2
  [nsenter]=util-linux [unshare]=util-linux [setsid]=util-linux [runuser]=util-linux [flock]=util-linux
  [hostname]=hostname [awk]=mawk [useradd]=passwd
  [setfacl]=acl
  [slurmdbd]=slurmdbd [sacct]=slurm-client [sacctmgr]=slurm-client
  [mariadbd]=mariadb-server [mariadb]=mariadb-client [mariadb-install-db]=mariadb-server
)
# Everything is looked up in sbin too: a root shell on a fresh machine may not have it on PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
# The cluster's second user runs the project with Debian's own python3 (root's may live where others cannot read).
[ -x /usr/bin/python3 ] || missing+=(/usr/bin/python3)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: slurm, slurmdbd, mariadb, munge, iproute2, python3 and acl already installed"
  exit 0
fi
echo "install_deps: missing: ${missing[*]}"

if [ "$(id -u)" -ne 0 ]; then
  echo "install_deps: must run as root (apt-get install)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_deps: no apt-get: this script supports Debian/Ubuntu only" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
PKGS=(slurm-wlm slurmdbd mariadb-server munge iproute2 util-linux hostname mawk passwd python3 acl)

have_lists() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
install() { apt-get install "${APT_OPTS[@]}" --no-install-recommends "${PKGS[@]}" </dev/null >/tmp/gl-install-deps.log 2>&1; }

start=$(date +%s)
if ! have_lists; then
  echo "install_deps: apt-get update (no package lists)"
  apt-get update -q </dev/null >/tmp/gl-install-deps.log 2>&1 || { cat /tmp/gl-install-deps.log >&2; exit 1; }
fi
if ! install; then
  # Stale lists (404 on a package) or a package the lists do not know: refresh once and retry.
  echo "install_deps: install failed with current package lists; apt-get update and retry"
  apt-get update -q </dev/null >/tmp/gl-install-deps.log 2>&1 || { cat /tmp/gl-install-deps.log >&2; exit 1; }
  install || { tail -n 40 /tmp/gl-install-deps.log >&2; exit 1; }
fi

# The packages' post-install scripts try to start services and fail harmlessly without systemd;
# local_cluster.sh starts its own daemons.  Check that the commands are there now.
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "install_deps: $cmd still missing after install" >&2; exit 1; }
done
echo "install_deps: installed ${PKGS[*]} in $(( $(date +%s) - start )) s"
