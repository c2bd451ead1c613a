#!/usr/bin/env bash
# Make a throwaway certificate authority and a SuperLink server certificate for TLS.
#
#   scripts/make-certs.sh [OUT_DIR] [EXTRA_SAN...]
#
# OUT_DIR defaults to ./certificates. The server certificate is valid for
# localhost, 127.0.0.1, ::1 and the compose service name `superlink`, plus every
# EXTRA_SAN (a DNS name or an IP address, e.g. `superlink.example.org 10.0.0.5`)
# so that SuperNodes on other machines can reach the SuperLink by its real name.
#
# Writes (PEM):
#   ca.crt      the CA certificate: give it to every SuperNode (--root-certificates),
#               SuperExec and `flwr` user; it is public
#   ca.key      the CA private key: keep it off the servers
#   server.pem  the SuperLink certificate, signed by the CA (--ssl-certfile)
#   server.key  its private key (--ssl-keyfile), mode 600
#
# Self-signed certificates are for tests and private deployments; use your
# organisation's CA for anything public. Existing files are kept unless --force.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

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

out_dir="${1:-certificates}"
if [[ $# -gt 0 ]]; then shift; fi
days="${CERT_DAYS:-365}"

command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found on PATH" >&2; exit 2; }

if [[ -e "$out_dir/server.pem" && $force -eq 0 ]]; then
  echo "make-certs.sh: $out_dir/server.pem exists; keeping it (pass --force to replace)" >&2
  exit 0
fi
mkdir -p "$out_dir"

sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
for san in "$@"; do
  if [[ "$san" =~ ^[0-9.]+$ || "$san" == *:* ]]; then sans+=",IP:$san"; else sans+=",DNS:$san"; fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The CA: a self-signed certificate allowed to sign others (basicConstraints CA:true).
openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -sha256 \
  -keyout "$work/ca.key" -out "$work/ca.crt" \
  -subj "/CN=FedSoup local CA" \
  -addext "basicConstraints=critical,CA:true" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# The server key and a request, then the CA signs it with the SANs: TLS clients
# (gRPC, httpx) match the host name against subjectAltName only, never the CN.
openssl req -newkey rsa:3072 -nodes -sha256 \
  -keyout "$work/server.key" -out "$work/server.csr" -subj "/CN=superlink" 2>/dev/null
cat > "$work/server.ext" <<EXT
basicConstraints=critical,CA:false
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
openssl x509 -req -in "$work/server.csr" -days "$days" -sha256 \
  -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null

chmod 600 "$work/ca.key" "$work/server.key"
chmod 644 "$work/ca.crt" "$work/server.pem"
# Move into place only when everything was made, so a failure leaves no half set.
mv -f "$work/ca.key" "$work/ca.crt" "$work/server.key" "$work/server.pem" "$out_dir/"
# Private keys must never be committed: the directory ignores itself.
[[ -e "$out_dir/.gitignore" ]] || printf '*\n' > "$out_dir/.gitignore"
echo "make-certs.sh: wrote $out_dir/{ca.crt,ca.key,server.pem,server.key} (SANs: $sans)"
