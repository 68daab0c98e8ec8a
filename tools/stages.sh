# One line a stage, full logs in files: sourced by qemu/run, qemu/cluster, image/build,
# image/build-stock, tests/run and tests/fresh-machine, from the repository's top.
#
#   . tools/stages.sh NAME      output of every stage goes to build/log/NAME.log (new each run)
#   stage TITLE CMD [ARG...]    runs CMD (a command or a function) with `set -e`, its output in
#                               the log; prints TITLE and, when CMD ends, its time, on one line.
#                               On a failure: the log's path and its last lines, then exit 1.
#   fail MESSAGE [HINT...]      says what failed (and what to do), exit 1
#   apt_install PKG...          apt-get update (once a run) and install, quietly, into the log
#   need_root                   exit with a clear message unless root
#   need_cargo                  exit with what to install unless a new enough Rust is there;
#                               installs the C compiler and linker it needs (gcc) when missing
#   http_ok PORT PATH           true when 127.0.0.1:PORT answers GET PATH with 200 within 3 s
#   at_exit CMD                 runs CMD when the script exits, however it exits (this file owns
#                               the EXIT trap)
#
# A command that fails outside a stage is named with its line by the ERR trap: under
# `set -euo pipefail` no script here exits without a word. Pipes that end early (`| head`,
# `| grep -q`) are avoided in these scripts: the writer dies of SIGPIPE, and pipefail turns
# that into a failure.
# shellcheck shell=bash

set -Eeuo pipefail
STAGES_NAME=$1
STAGES_SCRIPT=${STAGES_SCRIPT:-$STAGES_NAME}
mkdir -p build/log
STAGES_LOG=$PWD/build/log/$STAGES_NAME.log
STAGES_T0=$(date +%s%N)
STAGES_APT_UPDATED=0
STAGES_TICKER=
STAGES_AT_EXIT=()
printf '# %s, %s\n' "$STAGES_SCRIPT" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" > "$STAGES_LOG"

# Seconds (with tenths) since a `date +%s%N` reading, as "12.3 s" or "4 min 05 s".
stages_since() {
  local ds=$(( ($(date +%s%N) - $1) / 100000000 ))
  if [ $ds -lt 600 ]; then
    printf '%d.%d s' $((ds / 10)) $((ds % 10))
  else
    printf '%d min %02d s' $((ds / 600)) $((ds / 10 % 60))
  fi
}

stages_on_err() {
  local rc=$1 line=$2 cmd=$3
  trap - ERR
  printf '\n%s: line %s: "%s" failed (exit %s)\n  log: %s\n' \
    "$STAGES_SCRIPT" "$line" "$cmd" "$rc" "$STAGES_LOG" >&2
  exit "$rc"
}
trap 'stages_on_err $? $LINENO "$BASH_COMMAND"' ERR

at_exit() { STAGES_AT_EXIT+=("$1"); }
stages_exit() {
  local c
  [ -z "$STAGES_TICKER" ] || kill "$STAGES_TICKER" 2>/dev/null || true
  for c in "${STAGES_AT_EXIT[@]}"; do "$c" || true; done
}
trap stages_exit EXIT

fail() {
  trap - ERR
  printf '%s: %s\n' "$STAGES_SCRIPT" "$1" >&2
  shift
  local l
  for l in "$@"; do printf '  %s\n' "$l" >&2; done
  exit 1
}

# Prints "  TITLE   12.3 s": the title when the stage starts, the time when it ends. On a
# terminal the time ticks while the stage runs (the line is redrawn).
stage() {
  local title=$1 t0 rc
  shift
  t0=$(date +%s%N)
  printf '\n## %s (%s)\n' "$title" "$*" >> "$STAGES_LOG"
  printf '  %-40s ' "$title"
  if [ -t 1 ]; then
    (
      trap - ERR EXIT
      while sleep 1 && kill -0 $$ 2>/dev/null; do printf '\r  %-40s %s ' "$title" "$(stages_since "$t0")"; done
    ) &
    STAGES_TICKER=$!
  fi
  # Neither errexit nor the ERR trap may fire on the stage's own status: it is handled below.
  trap - ERR
  set +e
  (
    trap - EXIT
    trap 'echo "$0: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR
    set -e
    "$@"
  ) >> "$STAGES_LOG" 2>&1 < /dev/null
  rc=$?
  set -e
  trap 'stages_on_err $? $LINENO "$BASH_COMMAND"' ERR
  if [ -n "$STAGES_TICKER" ]; then
    kill "$STAGES_TICKER" 2>/dev/null || true
    wait "$STAGES_TICKER" 2>/dev/null || true
    STAGES_TICKER=
  fi
  # On a terminal the line is redrawn; elsewhere (a log, CI) the time completes it.
  local redraw=
  [ -t 1 ] && redraw=$(printf '\r  %-40s ' "$title")
  if [ $rc -eq 0 ]; then
    printf '%s%s\n' "$redraw" "$(stages_since "$t0")"
    return 0
  fi
  trap - ERR
  if [ $rc -eq 130 ]; then
    printf '%sinterrupted after %s\n' "$redraw" "$(stages_since "$t0")"
    exit 130
  fi
  printf '%sfailed after %s\n\n' "$redraw" "$(stages_since "$t0")"
  printf '%s: %s failed (exit %s). The last lines of its log:\n' "$STAGES_SCRIPT" "$title" "$rc" >&2
  tail -n 30 "$STAGES_LOG" | sed 's/^/  | /' >&2
  printf '  full log: %s\n' "$STAGES_LOG" >&2
  exit 1
}

# Total time since the script started.
stages_total() { stages_since "$STAGES_T0"; }

apt_install() {
  if [ $STAGES_APT_UPDATED -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    STAGES_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

need_root() {
  [ "$(id -u)" -eq 0 ] || fail "run me as root: $1"
}

# The workspace's rust-version; Debian 12's own rustc (1.63) is older.
need_cargo() {
  local want have
  want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
  command -v cargo >/dev/null 2>&1 ||
    fail "cargo not found: shoal builds with Rust ${want} or newer." \
      "Install it with rustup (https://rustup.rs), then open a new shell (or: . ~/.cargo/env)." \
      "Debian 12's rustc package is 1.63, too old for this workspace."
  have=$(rustc --version | awk '{print $2}')
  [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | sed -n 1p)" = "$want" ] ||
    fail "rustc $have is older than this workspace's rust-version $want: update Rust (rustup update)."
  # rustc links with `cc`, and ring compiles C: a fresh Debian has neither.
  if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/stdio.h ]; then
    command -v apt-get >/dev/null 2>&1 || fail "no C compiler (cc): install gcc and the C library headers"
    need_root "to install gcc, the C compiler and linker Rust needs, with apt"
    stage "installing gcc libc6-dev (Rust's linker)" apt_install gcc libc6-dev
  fi
}

# In a subshell that ignores SIGPIPE: a server that closes before reading the request (QEMU's
# port forwarding does, while the guest is not listening yet) must not kill the script.
http_ok() (
  local line req
  trap '' PIPE
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  printf -v req 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2"
  printf '%s' "$req" >&3 2>/dev/null || return 1
  IFS= read -r -t 3 line <&3 || return 1
  [[ $line == HTTP/1.?" 200"* ]]
)
