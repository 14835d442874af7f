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

/// What the registry enforces besides each object's own validation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Service VIPs must lie in one of these (none: any routable unicast address).
    pub service_cidrs: Vec<muon_core::net::Cidr>,
    /// The control plane's own addresses: no service may claim them.
    pub reserved: Vec<std::net::IpAddr>,
    pub max_object_bytes: usize,
    pub max_apply_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            service_cidrs: Vec::new(),
            reserved: Vec::new(),
            max_object_bytes: 1 << 20,
            max_apply_bytes: 8 << 20,
        }
    }
}

/// An object's size as the limits count it: its JSON form.
pub fn object_bytes(o: &muon_core::resource::Object) -> usize {
    o.to_json().to_string().len()
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// Objects over `--max-object-bytes`, and an apply over `--max-apply-bytes`.
pub fn size_problems(objects: &[muon_core::resource::Object], limits: &Limits) -> Vec<String> {
    let mut problems = Vec::new();
    let mut total = 0;
    for o in objects {
        let n = object_bytes(o);
        total += n;
        if n > limits.max_object_bytes {
            problems.push(format!(
                "{}: the object is {} ({n} bytes); the limit is {} (--max-object-bytes)",
                o.key(),
                human(n),
                human(limits.max_object_bytes)
            ));
        }
    }
    if total > limits.max_apply_bytes {
        problems.push(format!(
            "the apply is {} ({total} bytes) in {} objects; the limit is {} (--max-apply-bytes): apply them in smaller batches",
            human(total),
            objects.len(),
            human(limits.max_apply_bytes)
        ));
    }
    problems
}

/// Addresses that would capture or cut traffic: a VIP outside `--service-cidr`, a VIP that
/// is a workload's address (it would capture every direct connection to that workload) or
/// the control plane's (it would cut every sidecar off it), and a workload at a service's VIP
/// or the control plane's address. Reports problems of the objects being changed.
pub fn address_problems(
    after: &BTreeMap<&ObjectKey, &Stored>,
    changed: &[Stored],
    limits: &Limits,
) -> Vec<String> {
    use std::net::IpAddr;
    let mut workloads: BTreeMap<IpAddr, &ObjectKey> = BTreeMap::new();
    let mut vips: BTreeMap<IpAddr, &ObjectKey> = BTreeMap::new();
    for (key, s) in after {
        match &s.object.spec {
            Spec::Workload(w) => {
                if let Ok(ip) = w.address.parse() {
                    workloads.entry(ip).or_insert(key);
                }
            }
            Spec::Service(svc) => {
                for ip in svc.vips.iter().filter_map(|v| v.parse().ok()) {
                    vips.entry(ip).or_insert(key);
                }
            }
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for s in changed {
        let key = s.object.key();
        match &s.object.spec {
            Spec::Service(svc) => {
                for (i, vip) in svc.vips.iter().enumerate() {
                    let Ok(ip) = vip.parse::<IpAddr>() else {
                        continue;
                    };
                    let field = format!("{key}: spec.vips[{i}]");
                    if !limits.service_cidrs.is_empty()
                        && !limits.service_cidrs.iter().any(|c| c.contains(ip))
                    {
                        let cidrs: Vec<String> = limits
                            .service_cidrs
                            .iter()
                            .map(ToString::to_string)
                            .collect();
                        problems.push(format!(
                            "{field}: {ip} is outside the service CIDRs ({}; --service-cidr)",
                            cidrs.join(", ")
                        ));
                    }
                    if let Some(w) = workloads.get(&ip) {
                        problems.push(format!(
                            "{field}: {ip} is the address of {w}; a service VIP must not be a workload's address"
                        ));
                    }
                    if limits.reserved.contains(&ip) {
                        problems.push(format!("{field}: {ip} is the control plane's own address"));
                    }
                }
            }
            Spec::Workload(w) => {
                let Ok(ip) = w.address.parse::<IpAddr>() else {
                    continue;
                };
                if let Some(svc) = vips.get(&ip) {
                    problems.push(format!(
                        "{key}: spec.address: {ip} is a virtual IP of {svc}"
                    ));
                }
                if limits.reserved.contains(&ip) {
                    problems.push(format!(
                        "{key}: spec.address: {ip} is the control plane's own address"
                    ));
                }
            }
            _ => {}
        }
    }
    problems
}
