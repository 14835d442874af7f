# syntax=docker/dockerfile:1
# ghcr.io/muon-mesh/muon-control: the control plane (muon-control), with muonctl beside it
# for `kubectl exec` diagnostics.
#
#   docker build -f deploy/docker/control.Dockerfile -t ghcr.io/muon-mesh/muon-control:0.1.0 .
#
# Distroless (glibc, no shell, no package manager) and non-root: UID 1338, the control plane's
# (not the sidecars' 1337, whose user could otherwise read the CA's key). The Deployment of
# `muonctl install` also sets runAsNonRoot and a read-only root filesystem; muon-control
# writes only to its --data-dir (an emptyDir) and keeps the CA's root in a Secret.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p muon-control -p muonctl \
 && install -D -m 0755 target/release/muon-control /out/muon-control \
 && install -D -m 0755 target/release/muonctl /out/muonctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/muon-control /out/muonctl /usr/local/bin/
USER 1338:1338
# gRPC (discovery, management, identity), the admission webhook, metrics and health.
EXPOSE 15010 15017 15014
ENTRYPOINT ["/usr/local/bin/muon-control"]
