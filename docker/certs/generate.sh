#!/usr/bin/env bash
# Create a private CA and a SuperLink server certificate signed by it (openssl only).
#
#   docker/certs/generate.sh [-o OUT_DIR] [-n NAME] [-d DAYS] [SAN ...]
#
# SAN: every host name or IP address that SuperNodes, SuperExecs and `flwr` use to reach the
# SuperLink (`--superlink HOST:PORT`, `address = "HOST:PORT"`): the TLS handshake fails for any
# name missing here. Defaults: localhost, superlink and fleet-proxy (the compose services), 127.0.0.1, ::1.
#
# Writes OUT_DIR (default: docker/certs/out/, git-ignored):
#   ca.key ca.crt        the CA (created once, reused on later calls: keep ca.key offline)
#   NAME.key NAME.pem    the server key and certificate (NAME default: server), replaced each call
# SuperLink:  --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
# SuperNode:  --root-certificates ca.crt;  $FLWR_HOME/config.toml:  root-certificates = "ca.crt"
set -euo pipefail

out="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/out"
name=server
days=365
while getopts "o:n:d:h" opt; do
    case "$opt" in
        o) out=$OPTARG ;;
        n) name=$OPTARG ;;
        d) days=$OPTARG ;;
        h) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "$#" -gt 0 ] || set -- localhost superlink fleet-proxy 127.0.0.1 ::1

sans=""
for host in "$@"; do
    # An IPv4 or IPv6 literal becomes an IP SAN, anything else a DNS SAN.
    if [[ "$host" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$host" == *:* ]]; then
        sans+="${sans:+,}IP:$host"
    else
        sans+="${sans:+,}DNS:$host"
    fi
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

if [ ! -f ca.crt ] || [ ! -f ca.key ]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$((days * 10))" \
        -keyout ca.key -out ca.crt -subj "/O=prism-flwr/CN=prism-flwr SuperLink CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    echo "created CA $out/ca.crt"
fi

openssl req -new -newkey rsa:4096 -sha256 -nodes -keyout "$name.key" -out "$name.csr" \
    -subj "/O=prism-flwr/CN=$1" 2>/dev/null
extfile="$(mktemp)"
trap 'rm -f "$extfile" "$out/$name.csr"' EXIT
cat > "$extfile" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $sans
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EXT
openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile "$extfile" -out "$name.pem" 2>/dev/null
chmod 644 ca.crt "$name.pem"

openssl verify -x509_strict -CAfile ca.crt "$name.pem" >/dev/null
echo "created $out/$name.pem and $out/$name.key for: $sans (valid $days days)"
