//! The well-known ports and identities every Muon component agrees on.

/// Outbound capture: iptables redirects the app's outgoing TCP here.
pub const OUTBOUND: u16 = 15001;
/// Inbound capture: iptables redirects TCP arriving at the pod here.
pub const INBOUND: u16 = 15006;
/// Admin API, bound to 127.0.0.1 only.
pub const ADMIN: u16 = 15000;
/// Pod-facing health and metrics: /live, /ready, /metrics.
pub const HEALTH: u16 = 15020;
/// Control plane gRPC.
pub const CONTROL: u16 = 15010;

/// The UID (and GID) the sidecar runs as; muon-init excludes it from capture.
pub const PROXY_UID: u32 = 1337;

/// The UID the lab runs the control plane as: not the sidecars' (whose user could otherwise
/// read the CA's key and the administrator credential), not an app's.
pub const CONTROL_UID: u32 = 1338;

/// Source address the inbound proxy binds when it connects to the application, so that
/// muon-init can tell that connection apart from an app calling its own pod IP
/// (the same convention as Istio's 127.0.0.6).
pub const INBOUND_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// IPv6 counterpart of [`INBOUND_SOURCE_V4`]; muon-init adds it to `lo`.
pub const INBOUND_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The mesh's root namespace: a policy here without a selector applies to every workload of
/// the mesh (as Istio's root namespace does).
pub const ROOT_NAMESPACE: &str = "muon-system";

/// ALPN protocols of mesh connections between sidecars (mutual TLS): the inner protocol is
/// the sidecars' pooled HTTP/2, or the app's bytes as they are.
pub const ALPN_MESH_H2: &[u8] = b"muon/h2";
pub const ALPN_MESH_TCP: &[u8] = b"muon/tcp";
