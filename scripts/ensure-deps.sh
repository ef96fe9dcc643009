#!/usr/bin/env bash
# Install the Debian/Ubuntu packages stockade needs, only those missing. Idempotent.
#
#   ensure-deps.sh                         install what is missing
#   ensure-deps.sh --show-backports-source print the bookworm-backports entry this host
#                                          would get (nothing if it has one already)
#
# STOCKADE_APT_ETC (default /etc/apt) is where apt's sources are read and written.
set -euo pipefail
PKGS=(python3 python3-venv python3-pip bubblewrap util-linux iproute2 procps socat runsc qemu-system-x86 prometheus chromium chromium-driver supervisor passwd nodejs)
APT_ETC="${STOCKADE_APT_ETC:-/etc/apt}"
BACKPORTS_FILE="stockade-bookworm-backports.sources"

# apt's source files, in the order apt reads them: sources.list, then
# sources.list.d/ in name order (one-line *.list, deb822 *.sources; apt ignores
# every other name).
apt_source_files() {
  local f
  [ -f "$APT_ETC/sources.list" ] && printf '%s\n' "$APT_ETC/sources.list"
  for f in "$APT_ETC"/sources.list.d/*; do
    case "$f" in *.list | *.sources) [ -f "$f" ] && printf '%s\n' "$f" ;; esac
  done
  return 0
}

# apt_entry SUITE AS: the first enabled "deb" entry of apt's sources that serves
# SUITE's main component, printed as a deb822 entry for suite AS with the same
# URIs and the same trust (Signed-By, Trusted). Fails when none serves it.
apt_entry() {
  local files=()
  mapfile -t files < <(apt_source_files)
  [ ${#files[@]} -gt 0 ] || return 1
  awk -v suite="$1" -v as="$2" '
    function has(list, word,   n, i, a) {
      n = split(list, a, /[ \t]+/)
      for (i = 1; i <= n; i++) if (a[i] == word) return 1
      return 0
    }
    function emit(uris, signed_first, signed_rest, trusted) {
      print "Types: deb"
      print "URIs: " uris
      print "Suites: " as
      print "Components: main"
      if (signed_first != "" || signed_rest != "")
        print "Signed-By:" (signed_first != "" ? " " signed_first : "") signed_rest
      if (trusted != "") print "Trusted: " trusted
      found = 1
      exit 0
    }
    function reset() { types = uris = suites = comps = enabled = sfirst = srest = trusted = field = "" }
    # A deb822 stanza ends at a blank line or at the end of its file.
    function stanza_end() {
      if (types != "" && tolower(enabled) != "no" && has(types, "deb") && has(suites, suite) \
          && has(comps, "main") && uris != "")
        emit(uris, sfirst, srest, trusted)
      reset()
    }
    FNR == 1 { stanza_end(); deb822 = (FILENAME ~ /\.sources$/) }
    deb822 && /^[ \t]*#/ { next }
    deb822 && /^[ \t]*$/ { stanza_end(); next }
    deb822 && /^[ \t]/ {  # a continuation line: a multi-line value (an embedded key, more URIs)
      if (field == "signed-by") srest = srest "\n" $0
      else if (field == "uris") { v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v); uris = uris " " v }
      next
    }
    deb822 {
      field = tolower(substr($0, 1, index($0, ":") - 1))
      v = substr($0, index($0, ":") + 1)
      gsub(/^[ \t]+|[ \t]+$/, "", v)
      if (field == "types") types = v
      else if (field == "uris") uris = v
      else if (field == "suites") suites = v
      else if (field == "components") comps = v
      else if (field == "enabled") enabled = v
      else if (field == "signed-by") sfirst = v
      else if (field == "trusted") trusted = v
      next
    }
    {  # one-line: deb [opt=value ...] URI SUITE COMPONENT...
      line = $0
      sub(/#.*/, "", line)
      opts = ""
      if (match(line, /\[[^]]*\]/)) {
        opts = substr(line, RSTART + 1, RLENGTH - 2)
        line = substr(line, 1, RSTART - 1) " " substr(line, RSTART + RLENGTH)
      }
      n = split(line, w, /[ \t]+/)
      k = 0
      for (i = 1; i <= n; i++) if (w[i] != "") t[++k] = w[i]
      if (k < 4 || t[1] != "deb" || t[3] != suite) next
      comps = ""
      for (i = 4; i <= k; i++) comps = comps " " t[i]
      if (!has(comps, "main")) next
      signed = trusted = ""
      m = split(opts, o, /[ \t]+/)
      for (i = 1; i <= m; i++) {
        eq = index(o[i], "=")
        if (eq == 0) continue
        key = tolower(substr(o[i], 1, eq - 1))
        if (key == "signed-by") signed = substr(o[i], eq + 1)
        else if (key == "trusted") trusted = substr(o[i], eq + 1)
      }
      emit(t[2], signed, "", trusted)
    }
    END { if (!found) stanza_end(); exit(found ? 0 : 1) }
  ' "${files[@]}"
}

# What this host's apt sources lack for runsc from bookworm-backports: nothing
# when an enabled entry serves bookworm-backports already; otherwise an entry for
# it made from the one that serves bookworm main, so a host on its own mirror
# (and its own keyring) keeps using it.
backports_source() {
  apt_entry bookworm-backports bookworm-backports >/dev/null && return 0
  if ! apt_entry bookworm bookworm-backports; then
    echo "stockade: no apt source in $APT_ETC serves Debian bookworm main; add bookworm-backports" \
      "to apt's sources yourself (runsc >= ${RUNSC_MIN#0.0~} comes from there)" >&2
    return 1
  fi
}

# Debian 12's own runsc (2022-12) answers statx(AT_NO_AUTOMOUNT) with EINVAL, so
# coreutils' ls and stat fail inside every gVisor sandbox; the build in Debian's
# bookworm-backports (2024-07) does not. On Debian 12 that one is installed, and
# only that package is taken from backports (-t; backports is never preferred
# otherwise). docs/runtime-gvisor.md.
RUNSC_MIN="0.0~20240729"

if [ "${1:-}" = --show-backports-source ]; then
  backports_source
  exit
fi

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
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
# npm: Debian's package, unless the nodejs installed already brings its own (NodeSource's does).
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && [ $backports -eq 0 ] && exit 0

if [ $backports -eq 1 ]; then
  entry="$(backports_source)" || exit 1
  if [ -n "$entry" ]; then
    echo "stockade: adding bookworm-backports from this host's own Debian source (for runsc >= ${RUNSC_MIN#0.0~})"
    printf '%s\n' "$entry" | $SUDO tee "$APT_ETC/sources.list.d/$BACKPORTS_FILE" >/dev/null
  fi
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
