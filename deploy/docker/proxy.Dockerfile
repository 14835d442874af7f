# syntax=docker/dockerfile:1
# ghcr.io/muon-mesh/muon-proxy: the sidecar (muon-proxy) and its capture setup (muon-init).
#
#   docker build -f deploy/docker/proxy.Dockerfile -t ghcr.io/muon-mesh/muon-proxy:0.1.0 .
#
# The image runs as UID 1337, the proxy's: muon-init's iptables rules exclude that UID from
# capture, so the proxy's own connections are not redirected back to it. The injected init
# container runs /usr/local/bin/muon-init from this same image as root (runAsUser: 0) with
# only NET_ADMIN and NET_RAW: iptables-restore needs them to install the MUON_* chains in the
# pod's network namespace, and nothing else in the pod gets them.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p muon-proxy -p muon-init \
 && install -D -m 0755 target/release/muon-proxy /out/muon-proxy \
 && install -D -m 0755 target/release/muon-init /out/muon-init

# Debian slim rather than distroless: muon-init runs iptables-restore/ip6tables-restore
# (nft and legacy backends) and `ip`.
FROM debian:${DEBIAN}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 muon-proxy \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin muon-proxy
COPY --from=build /out/muon-proxy /out/muon-init /usr/local/bin/
USER 1337:1337
# Outbound and inbound capture, admin (127.0.0.1 only), health and metrics.
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/muon-proxy"]
