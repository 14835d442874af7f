//! Workload identities: SPIFFE ids of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the one form a Muon
//! certificate's URI SAN takes, and the principals policies name (the same without
//! `spiffe://`).

use std::fmt;

/// A workload's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// An identity from its parts, each checked (a trust domain is a DNS subdomain; a
    /// namespace and a service account are DNS labels and subdomains, as in Kubernetes).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, String> {
        crate::resource::check_dns_subdomain(trust_domain)
            .map_err(|e| format!("trust domain {trust_domain:?}: {e}"))?;
        crate::resource::check_dns_label(namespace)
            .map_err(|e| format!("namespace {namespace:?}: {e}"))?;
        crate::resource::check_dns_subdomain(service_account)
            .map_err(|e| format!("service account {service_account:?}: {e}"))?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`, or the principal form `td/ns/NS/sa/SA`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a SPIFFE id like spiffe://cluster.local/ns/shop/sa/web");
        let rest = s.strip_prefix("spiffe://").unwrap_or(s);
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                Self::new(td, ns, sa).map_err(|e| format!("{}: {e}", bad()))
            }
            _ => Err(bad()),
        }
    }

    /// `td/ns/NS/sa/SA`: how policies name it.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_in_both_forms_and_print_back() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "orders");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/orders");
        assert_eq!(
            SpiffeId::parse("cluster.local/ns/shop/sa/orders").unwrap(),
            id
        );
        for bad in [
            "",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/sa/x/ns/y",
            "spiffe://Bad Domain/ns/shop/sa/x",
            "spiffe://cluster.local/ns/Shop/sa/x",
            "spiffe://cluster.local/ns/shop/sa/x/extra",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
