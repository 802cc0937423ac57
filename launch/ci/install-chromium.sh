#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_report.py, which opens the run report in headless
# Chromium (screenshot, console, rendered plots). Safe to run again: installs only what is missing.
set -euo pipefail

if command -v chromium > /dev/null; then
  echo "install-chromium.sh: chromium already installed"
  exit 0
fi
if (( EUID != 0 )); then
  echo "install-chromium.sh: need root to install chromium; the browser test of the report will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium
