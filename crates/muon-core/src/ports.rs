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

/// Source address the inbound proxy binds when it connects to the application, so that
/// muon-init can tell that connection apart from an app calling its own pod IP
/// (the same convention as Istio's 127.0.0.6).
pub const INBOUND_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// IPv6 counterpart of [`INBOUND_SOURCE_V4`]; muon-init adds it to `lo`.
pub const INBOUND_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
