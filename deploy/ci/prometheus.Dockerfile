# Prometheus for CI, where no image registry is reachable: Debian's `prometheus` package
# on the debootstrapped base (deploy/ci/base-image.sh). Same entrypoint and paths as the
# official prom/prometheus image, so docker-compose.yml's command works for both.
ARG BASE_IMAGE=effnet-ci/bookworm-python:3.11
FROM ${BASE_IMAGE}
# CI-only image; the package version is whatever bookworm ships.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o 65534 -g 65534 /prometheus
# nobody, like the official image
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
