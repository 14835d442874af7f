//! Rules that span objects, checked on the state after an apply, before anything is stored:
//! two services may not share a VIP and port.

use crate::model::Stored;
use muon_core::resource::{ObjectKey, Spec};
use std::collections::BTreeMap;

/// Two services may not claim the same virtual IP and port: a sidecar could not tell which
/// one a connection is for. Reports conflicts that involve an object being changed.
pub fn vip_conflicts(after: &BTreeMap<&ObjectKey, &Stored>, changed: &[Stored]) -> Vec<String> {
    let mut claims: BTreeMap<(std::net::IpAddr, u32), &ObjectKey> = BTreeMap::new();
    let mut problems = Vec::new();
    let changed: Vec<ObjectKey> = changed.iter().map(|s| s.object.key()).collect();
    for (key, s) in after {
        let Spec::Service(svc) = &s.object.spec else {
            continue;
        };
        for vip in &svc.vips {
            let Ok(ip) = vip.parse() else { continue };
            for p in &svc.ports {
                match claims.get(&(ip, p.port)) {
                    Some(other) if changed.contains(key) || changed.contains(other) => {
                        let (this, that) = if changed.contains(key) {
                            (*key, *other)
                        } else {
                            (*other, *key)
                        };
                        problems.push(format!(
                            "{this}: spec.vips: {vip} port {} is already used by {that}",
                            p.port
                        ));
                    }
                    Some(_) => {}
                    None => {
                        claims.insert((ip, p.port), key);
                    }
                }
            }
        }
    }
    problems
}
