#!/usr/bin/env bash
# Install SLURM and munge from Debian's packages for tests/test_launch_slurm.py (which starts
# its own single-node cluster on 127.0.0.1). Safe to run again: installs only what is missing.
set -euo pipefail

missing=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${tool%%:*}" > /dev/null || missing+=("${tool#*:}")
done
if (( ${#missing[@]} == 0 )); then
  echo "install-slurm.sh: slurm and munge already installed"
  exit 0
fi
if (( EUID != 0 )); then
  echo "install-slurm.sh: need root to install ${missing[*]}; the slurm tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
