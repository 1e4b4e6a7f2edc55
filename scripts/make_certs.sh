#!/usr/bin/env bash
# Make a private certificate authority and a SuperLink certificate, for TLS between the SuperLink,
# the SuperNodes and `flwr run` on hosts you control (see README, "Deploy on Flower").
#
#   scripts/make_certs.sh [OUT_DIR] [HOST ...]      defaults: certs  127.0.0.1 localhost
#
# Writes OUT_DIR/ca.crt (give it to SuperNodes and `flwr`), OUT_DIR/ca.key (keep it offline),
# OUT_DIR/server.pem and OUT_DIR/server.key (the SuperLink's; the certificate names every HOST
# as a subject alternative name: IP addresses as IP entries, other names as DNS entries).
set -euo pipefail

out="${1:-certs}"
if [ "$#" -gt 0 ]; then shift; fi
hosts=("$@")
if [ "${#hosts[@]}" -eq 0 ]; then hosts=(127.0.0.1 localhost); fi
command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 2; }

san=""
for h in "${hosts[@]}"; do
    if [[ "$h" =~ ^[0-9]+(\.[0-9]+){3}$ || "$h" == *:* ]]; then entry="IP:$h"; else entry="DNS:$h"; fi
    san="${san:+$san,}$entry"
done

mkdir -p "$out"
umask 077
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 825 \
    -subj "/CN=fedsim local CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -new -newkey rsa:3072 -nodes -sha256 \
    -subj "/CN=${hosts[0]}" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
cat > "$out/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days 825 -in "$out/server.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "wrote $out/ca.crt, $out/ca.key, $out/server.pem, $out/server.key (SAN: $san)"
