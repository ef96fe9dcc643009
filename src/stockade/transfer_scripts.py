"""The shell the isolate runs for a transfer (transfer.py): unpacking an upload, checking the
room for one, packing a download into pieces. Every path is a quoted positional argument; they
use only what every runtime's isolate has (a POSIX sh, coreutils' df, stat, tail, tar, split).
"""

NOT_FOUND = 66  # the download script's exit status for a missing path (EX_NOINPUT)
A_LINK = 65  # and for a path that is a symbolic link (its target on stdout)
OVER_MAX = 67  # and for an archive over max_bytes ("SIZE")
NO_ROOM = 68  # and for one the sandbox has no room to stage ("SIZE FREE USED")
# What a download leaves the sandbox's own processes (the agent, tar, the code's) of its memory
# limit, beside the files and the staged archive: below it, staging would risk its OOM kill.
STAGING_RESERVE = 64 << 20

# The parts are files in /tmp named by a random base: BASE.000000, BASE.000001, ...
UNPACK = 'mkdir -p -- "$2" && cat -- "$1".[0-9]* | tar -x --no-same-owner -f - -C "$2"\ns=$?\nrm -f -- "$1".*\nexit $s'
# "FREE_KIB USED_KIB FILESYSTEM" of the filesystem holding $1, from df's POSIX output, with the shell
# alone: no awk (the isolates' /etc has no alternatives link for it, and mawk prints big numbers
# as floats), and the sums in the shell's 64-bit arithmetic.
DF_OF = """df_of() { set -- $(df -P -k -- "$1" | tail -n 1); echo "$4 $3"; }
"""
# Pieces no larger than the policy's max_file_size_bytes (RLIMIT_FSIZE, in 512-byte blocks).
# The archive is staged in /tmp, which is the sandbox's memory (a tmpfs): it is measured first
# (stored nowhere), and refused when it is over max_bytes (67: "SIZE"), or would not fit the free
# scratch space or, given the sandbox's memory limit, its memory (68: "SIZE FREE USED"): staging
# it anyway would end the sandbox, and everything in it, for memory.
# GNU's format, named: long names as GNU headers, never PAX records (transfer_unpack.py refuses
# them). Where two pieces meet, a seam: the last SEAM bytes of one and the first of the next,
# BASE.s000000 after BASE.000000 (each piece's read is redacted alone: a secret's value written
# across two would come through; the host holds each seam to the pieces as it read them). It
# answers "TAR_STATUS SIZE PIECE_SIZE SEAM".
PACK = (
    DF_OF
    + """src=$1 parent=$2 name=$3 out=$4 max=$5 piece=$6 memory=$7 reserve=$8 seam=$9
if [ -L "$src" ]; then readlink -- "$src"; exit 65
elif [ -d "$src" ]; then set -- -C "$src" .
elif [ -e "$src" ]; then set -- -C "$parent" "./$name"
else echo "$src: No such file or directory" >&2; exit 66
fi
size=$(tar --format=gnu -cf - --exclude="${out##*/}.*" "$@" 2>/dev/null | head -c "$((max + 1))" | wc -c)
[ "$size" -gt "$max" ] && { echo "$size"; exit 67; }
blocks=$(ulimit -f)
case $blocks in *[!0-9]*|'') ;; *) [ "$((blocks * 512))" -lt "$piece" ] && piece=$((blocks * 512)) ;; esac
[ "$piece" -lt 512 ] && { echo "files of at most $piece bytes (max_file_size_bytes) hold no piece" >&2; exit 70; }
[ "$((seam * 2))" -gt "$piece" ] && seam=$((piece / 2))  # a seam is a file too: within the limit
staged=$((size + (size - 1) / piece * 2 * seam))
room=$(df_of /tmp)
free=$((${room%% *} * 1024)) rest=${room#* }
used=$((${rest%% *} * 1024))
if [ -d /work ] && [ "$(stat -c %d /tmp)" != "$(stat -c %d /work)" ]; then  # gVisor's /work: memory too
  there=$(df_of /work) rest=${there#* }
  used=$((used + ${rest%% *} * 1024))
fi
if [ "$staged" -gt "$free" ] || { [ "$memory" -gt 0 ] && [ "$((used + staged + reserve))" -gt "$memory" ]; }; then
  echo "$staged $free $used"; exit 68
fi
{ tar --format=gnu -cf - --exclude="${out##*/}.*" "$@"; echo $? >"$out.rc"; } | head -c "$((max + 1))" \
  | split -a 6 -d -b "$piece" - "$out." || { echo "cutting the archive into pieces failed" >&2; exit 70; }
last=
for part in "$out".[0-9]*; do
  [ -n "$last" ] && { tail -c "$seam" -- "$last"; head -c "$seam" -- "$part"; } >"$out.s${last##*.}"
  last=$part
done
echo "$(cat -- "$out.rc") $(cat -- "$out".[0-9]* 2>/dev/null | wc -c) $piece $seam"
"""
)
REMOVE = 'rm -f -- "$1".*'
# Before an upload: room for its archive in /tmp, and for what it unpacks to when the destination
# is in the same scratch tmpfs; with the memory limit known, within it (68: "FREE NEED USED").
ROOM = (
    DF_OF
    + """dest=$1 size=$2 memory=$3 reserve=$4
d=$dest; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
room=$(df_of /tmp)
free=$((${room%% *} * 1024)) rest=${room#* }
used=$((${rest%% *} * 1024)) need=$((size * 2)) held=$((size * 2))
if [ "$(stat -c %d /tmp)" != "$(stat -c %d -- "$d")" ]; then  # another filesystem (gVisor's /work, a mount)
  need=$size held=$size
  there=$(df_of "$d")
  there_free=$((${there%% *} * 1024)) rest=${there#* }
  there_used=$((${rest%% *} * 1024))
  [ "$size" -gt "$there_free" ] && { echo "$there_free $size $there_used"; exit 68; }
  # Memory too when it is a tmpfs (by its type: gVisor names every filesystem's device "none").
  case $(stat -f -c %T -- "$d") in tmpfs|ramfs) used=$((used + there_used)) held=$((size * 2)) ;; esac
fi
if [ "$need" -gt "$free" ] || { [ "$memory" -gt 0 ] && [ "$((used + held + reserve))" -gt "$memory" ]; }; then
  echo "$free $need $used"; exit 68
fi
"""
)
