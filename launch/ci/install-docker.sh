#!/usr/bin/env bash
# Install Debian's Docker engine and debootstrap for tests/test_launch_docker.py, which starts
# its own engine on a socket of its own and builds its base image with debootstrap (no image
# registry is needed). Safe to run again: installs only what is missing.
set -euo pipefail

missing=()
for tool in dockerd:docker.io docker:docker.io debootstrap:debootstrap; do
  command -v "${tool%%:*}" > /dev/null || missing+=("${tool#*:}")
done
if (( ${#missing[@]} == 0 )); then
  echo "install-docker.sh: docker and debootstrap already installed"
  exit 0
fi
if (( EUID != 0 )); then
  echo "install-docker.sh: need root to install ${missing[*]}; the docker image test will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# sort -u: docker.io is listed once per missing tool
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
apt-get install -y -q --no-install-recommends "${packages[@]}"
