# syntax=docker/dockerfile:1
# Peregrine's service image: built with the repository's locked dependencies,
# run as an unprivileged user on a slim Debian. scripts/check-ops lints this
# file with hadolint; no image is built there (no Docker engine on those
# machines), so the first real build is the proof that it builds.
#
#   docker build -t peregrine:0.1.0 .
#   docker build --build-arg FEATURES= -t peregrine:0.1.0-plaintext .   # no TLS/SASL

FROM rust:1-bookworm AS build
# cmake and the libcurl headers build librdkafka from source; OpenSSL and
# Cyrus SASL are for the `tls` feature (SASL_SSL to managed Kafka).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG FEATURES=tls
# The cache mounts keep the registry and the build between image builds; the
# binary is copied out because the target directory is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features "$FEATURES" \
 && cp target/release/peregrine /usr/local/bin/peregrine

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 peregrine \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin peregrine
COPY --from=build /usr/local/bin/peregrine /usr/local/bin/peregrine
# The built-in model is compiled into the binary; these files are there for
# `--model` / `--rules` and for POST /v1/model/reload.
COPY models/ /usr/share/peregrine/models/
USER 10001:10001
# Fails the build if a shared library the binary needs is missing.
RUN ["peregrine", "--help"]
ENV PEREGRINE_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["peregrine", "serve"]
