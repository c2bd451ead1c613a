#!/usr/bin/env bash
# Make the SuperNode authentication material: an EC key pair per SuperNode and the
# SuperExec shared secrets.
#
#   scripts/make-node-keys.sh [OUT_DIR] [N]
#
# OUT_DIR defaults to ./keys, N (the number of SuperNodes) to 3. Writes:
#   supernode-<i>.key     SuperNode i's private key (EC P-384, OpenSSH format), mode 600:
#                         it stays on that node (flower-supernode --auth-supernode-private-key)
#   supernode-<i>.pub     its public key: register it with the SuperLink,
#                         `flwr supernode register keys/supernode-<i>.pub <connection>`
#   supernode-<i>.secret  the SuperExec shared secret of SuperNode i and its ClientApp
#                         SuperExec (--superexec-auth-secret-file on both), mode 600
#   superlink.secret      the same for the SuperLink and the ServerApp's SuperExec
# (i = 1..N, as the compose services supernode-1..N). A secret is 64 hex characters,
# no newline: Flower reads the file as raw bytes.
#
# Existing files are kept (run again with a larger N to add nodes) unless --force:
# a new key must be registered again, and an unregistered key can never be
# registered again. Needs ssh-keygen (OpenSSH). The directory ignores itself in git.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

force=0
args=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --force) force=1 ;;
    *) args+=("$arg") ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"

out_dir="${1:-keys}"
count="${2:-3}"
[[ "$count" =~ ^[1-9][0-9]*$ ]] || { echo "make-node-keys.sh: N must be a positive integer, got '$count'" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "make-node-keys.sh: ssh-keygen not found on PATH (install OpenSSH)" >&2; exit 2; }

mkdir -p "$out_dir"
# Private keys must never be committed: the directory ignores itself, from the start.
[[ -e "$out_dir/.gitignore" ]] || printf '*\n' > "$out_dir/.gitignore"
umask 077

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

new_secret() {  # 32 random bytes as hex, written whole or not at all
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$work/secret"
  [[ "$(wc -c < "$work/secret")" -eq 64 ]] || { echo "make-node-keys.sh: could not read /dev/urandom" >&2; exit 1; }
  chmod 600 "$work/secret"
  mv -f "$work/secret" "$1"
}

made=()
if [[ $force -eq 1 || ! -e "$out_dir/superlink.secret" ]]; then
  new_secret "$out_dir/superlink.secret"; made+=(superlink.secret)
fi
for i in $(seq 1 "$count"); do
  name="supernode-$i"
  if [[ $force -eq 1 || ! -e "$out_dir/$name.key" || ! -e "$out_dir/$name.pub" ]]; then
    rm -f "$work/key" "$work/key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$work/key"
    chmod 600 "$work/key"; chmod 644 "$work/key.pub"
    mv -f "$work/key.pub" "$out_dir/$name.pub"
    mv -f "$work/key" "$out_dir/$name.key"
    made+=("$name.key" "$name.pub")
  fi
  if [[ $force -eq 1 || ! -e "$out_dir/$name.secret" ]]; then
    new_secret "$out_dir/$name.secret"; made+=("$name.secret")
  fi
done

if [[ ${#made[@]} -eq 0 ]]; then
  echo "make-node-keys.sh: $out_dir already holds keys for $count SuperNodes; keeping them (--force replaces)" >&2
else
  echo "make-node-keys.sh: wrote ${made[*]} in $out_dir"
fi
