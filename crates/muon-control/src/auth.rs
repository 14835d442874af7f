//! Who is calling: the control plane derives a caller from the certificate its TLS
//! connection presented, never from what a request says.
//!
//! - An administrator presents a certificate for `spiffe://<trust-domain>/muon/admin/<name>`
//!   (the control plane writes one to `<data-dir>/admin/` on first start; `muonctl` uses it).
//! - A workload presents its mesh certificate, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//! - A TLS connection without a certificate is anonymous: it may only ask for its first
//!   certificate with a credential (`Identity.Certify`) and read gRPC reflection.
//! - A plaintext connection is accepted only with `--insecure-plaintext`, and is then trusted
//!   as anything (tests, benchmarks, a control plane on a private host).
//!
//! The gate classifies each connection once, at its handshake; every call on it finds its
//! [`ConnInfo`] in the request's extensions.

use muon_core::identity::SpiffeId;
use std::net::SocketAddr;
use tonic::{Request, Status};

/// What a connection proved, found in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub caller: Caller,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An administrator's certificate (its name).
    Admin(String),
    /// A workload's mesh certificate.
    Workload(SpiffeId),
    /// TLS, no certificate.
    Anonymous,
    /// Plaintext, accepted with `--insecure-plaintext`: trusted as anything.
    Insecure,
}

impl Caller {
    /// The caller a verified certificate (its URI SANs) names, in `trust_domain`.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>, trust_domain: &str) -> Caller {
        let admin = format!("spiffe://{trust_domain}/muon/admin/");
        for uri in uris {
            if let Some(name) = uri.strip_prefix(&admin) {
                return Caller::Admin(name.to_owned());
            }
            if let Ok(id) = SpiffeId::parse(uri) {
                if uri.starts_with("spiffe://") && id.trust_domain == trust_domain {
                    return Caller::Workload(id);
                }
            }
        }
        Caller::Anonymous
    }
}

/// The SPIFFE URI an administrator certificate carries.
pub fn admin_uri(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/muon/admin/{name}")
}

/// The caller of a request, and its address for logs.
pub struct Peer {
    pub addr: String,
    pub caller: Caller,
}

impl Peer {
    pub fn of<T>(req: &Request<T>) -> Peer {
        Self::from_extensions(req.extensions())
    }

    pub fn from_extensions(ext: &http::Extensions) -> Peer {
        match ext.get::<ConnInfo>() {
            Some(info) => Peer {
                addr: info.remote.to_string(),
                caller: info.caller.clone(),
            },
            // Served without the gate (an in-process test server): trusted, as plaintext is.
            None => Peer {
                addr: "in-process".into(),
                caller: Caller::Insecure,
            },
        }
    }
}

/// Management calls (and minting join tokens) need an administrator.
pub fn require_admin<T>(req: &Request<T>) -> Result<(), Status> {
    let peer = Peer::of(req);
    match peer.caller {
        Caller::Admin(_) | Caller::Insecure => Ok(()),
        Caller::Workload(id) => {
            tracing::warn!(peer = %peer.addr, identity = %id, "management call refused: a workload is not an administrator");
            Err(Status::permission_denied(format!(
                "{id} is a workload identity, not an administrator: the management API needs an administrator credential"
            )))
        }
        Caller::Anonymous => {
            tracing::warn!(peer = %peer.addr, "management call refused: no client certificate");
            Err(Status::unauthenticated(
                "the management API needs an administrator credential (muonctl --credentials DIR: muon-control writes one to <data-dir>/admin)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_name_admins_workloads_or_nobody() {
        let td = "cluster.local";
        assert_eq!(
            Caller::from_uris(["spiffe://cluster.local/muon/admin/ops"], td),
            Caller::Admin("ops".into())
        );
        assert_eq!(
            Caller::from_uris(["spiffe://cluster.local/ns/shop/sa/web"], td),
            Caller::Workload(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap())
        );
        // Another mesh's, or a principal without the scheme: nobody.
        for uris in [
            vec!["spiffe://other.mesh/muon/admin/ops"],
            vec!["spiffe://other.mesh/ns/shop/sa/web"],
            vec!["cluster.local/ns/shop/sa/web"],
            vec![],
        ] {
            assert_eq!(
                Caller::from_uris(uris.clone(), td),
                Caller::Anonymous,
                "{uris:?}"
            );
        }
    }
}
