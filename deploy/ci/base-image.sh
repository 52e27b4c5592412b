#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image without any image registry.
#
#   deploy/ci/base-image.sh [TAG]        (default TAG: effnet-ci/bookworm-python:3.11)
#
# debootstrap (minbase) + python3 (3.11 on bookworm) + python3-venv + ca-certificates,
# with this host's CA bundle copied in (so pip and apt inside containers trust the same
# TLS endpoints as the host), then `docker import`. Idempotent: a tag that already exists
# is reused, and the root filesystem tarball is cached in $EFFNET_CI_CACHE so that a
# second run on the same machine skips debootstrap even if the docker data root is new.
set -euo pipefail

TAG=${1:-${BASE_TAG:-effnet-ci/bookworm-python:3.11}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${EFFNET_CI_CACHE:-/var/cache/effnet-ci}
TARBALL="$CACHE/bookworm-python311-rootfs.tar"
HOST_CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { printf '[base-image] %s\n' "$*"; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "image $TAG exists; reusing it"
    exit 0
fi

mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 1; }
    ROOT=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$ROOT" "$TARBALL.tmp"' EXIT
    log "debootstrap bookworm into $ROOT (a few minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates \
        bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # Trust what the host trusts (a TLS-inspecting egress proxy's CA, say). The bundle is
    # public certificates only; nothing secret goes into the image.
    if [ -s "$HOST_CA" ]; then
        cp "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca-bundle.crt"
        cp "$HOST_CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"
    fi
    chroot "$ROOT" apt-get clean
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/* \
           "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* \
           "$ROOT"/tmp/* "$ROOT"/root/.cache
    # debootstrap leaves the host's resolv.conf/hostname behind; docker supplies its own.
    rm -f "$ROOT/etc/resolv.conf" "$ROOT/etc/hostname"
    log "packing root filesystem"
    tar -C "$ROOT" --numeric-owner -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOT"
    trap - EXIT
fi

ca_env=()
if [ -s "$HOST_CA" ]; then
    ca_env=(--change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt'
            --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt'
            --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt')
fi
log "docker import -> $TAG"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    "${ca_env[@]}" \
    --change 'CMD ["python3"]' \
    "$TARBALL" "$TAG" >/dev/null
docker run --rm "$TAG" python3 -c 'import sys, ssl, venv; print("[base-image] python", sys.version.split()[0], "ok")'
