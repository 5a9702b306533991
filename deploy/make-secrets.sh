#!/bin/sh
# Writes deploy/.env for deploy/compose.yaml with random credentials (mode 0600), from
# deploy/.env.example. Refuses to overwrite an existing file: the Postgres and MinIO volumes
# keep the passwords they were first started with.
#
#   sh deploy/make-secrets.sh [OUTPUT]        (default: deploy/.env)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/.env"}
if [ -e "$out" ]; then
    echo "$out exists; not overwritten (delete it first, together with the volumes, to start over)" >&2
    exit 1
fi

# Hex only, so that the values can stand in URLs unescaped.
random_hex() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex "$1"
    else
        od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
    fi
}

umask 077
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
sed \
    -e "s/^POSTGRES_PASSWORD=\$/POSTGRES_PASSWORD=$(random_hex 24)/" \
    -e "s/^REDIS_PASSWORD=\$/REDIS_PASSWORD=$(random_hex 24)/" \
    -e "s/^MINIO_ROOT_USER=\$/MINIO_ROOT_USER=root-$(random_hex 6)/" \
    -e "s/^MINIO_ROOT_PASSWORD=\$/MINIO_ROOT_PASSWORD=$(random_hex 24)/" \
    -e "s/^S3_ACCESS_KEY=\$/S3_ACCESS_KEY=imagegen-$(random_hex 6)/" \
    -e "s/^S3_SECRET_KEY=\$/S3_SECRET_KEY=$(random_hex 24)/" \
    -e "s/^URL_SIGNING_KEY=\$/URL_SIGNING_KEY=$(random_hex 32)/" \
    "$here/.env.example" > "$tmp"
chmod 600 "$tmp"
mv "$tmp" "$out"
echo "wrote $out (mode 0600)"
