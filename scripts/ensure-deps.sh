#!/usr/bin/env bash
# Install the Debian/Ubuntu packages stockade needs, only those missing. Idempotent.
set -euo pipefail
PKGS=(python3 python3-venv python3-pip bubblewrap util-linux iproute2 procps socat runsc qemu-system-x86)
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# Debian 12's own runsc (2022-12) answers statx(AT_NO_AUTOMOUNT) with EINVAL, so
# coreutils' ls and stat fail inside every gVisor sandbox; the build in Debian's
# bookworm-backports (2024-07) does not. On Debian 12 that one is installed, and
# only that package is taken from backports (-t; backports is never preferred
# otherwise). docs/runtime-gvisor.md.
RUNSC_MIN="0.0~20240729"
codename="$( (. /etc/os-release && echo "${VERSION_CODENAME:-}") 2>/dev/null || true)"
runsc_from_backports() {
  [ "$codename" = bookworm ] || return 1
  local have
  have="$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)"
  [ -z "$have" ] || ! dpkg --compare-versions "$have" ge "$RUNSC_MIN"
}

backports=0
runsc_from_backports && backports=1
missing=()
for p in "${PKGS[@]}"; do
  [ "$p" = runsc ] && [ $backports -eq 1 ] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && [ $backports -eq 0 ] && exit 0

if [ $backports -eq 1 ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "stockade: adding Debian's bookworm-backports (for runsc >= ${RUNSC_MIN#0.0~})"
  printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" "Components: main" \
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
    $SUDO tee /etc/apt/sources.list.d/stockade-bookworm-backports.sources >/dev/null
fi
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "stockade: installing ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ $backports -eq 1 ]; then
  echo "stockade: installing runsc from bookworm-backports"
  $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports runsc
fi
