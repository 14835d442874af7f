//! What the control plane has sent, per kind: the last good version of every resource and
//! the version of the last response accepted whole. Responses are applied here, resource by
//! resource: what is valid replaces or removes what was there, what is not is rejected with
//! its reason while its last good version stays (ztunnel's `handle_single_resource`).
//!
//! Pure and synchronous: the client feeds it responses, the cache feeds it saved state, and
//! `table` compiles the [`Mesh`] it keeps up to date.

use super::convert;
use crate::model::{Mesh, ServiceDef};
use muon_api::v1::kinds::{PerKind, ResourceKind};
use muon_api::v1::{resource::Kind, DiscoveryResponse, Resource};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// One kind's accepted resources.
#[derive(Debug, Default, Clone)]
pub struct KindState {
    /// The version of the last response accepted without rejections ("" = none yet).
    pub version: String,
    /// Set once a response of this kind arrived (or was loaded from disk).
    pub received: bool,
    /// By resource name: the resource as sent, for `/config_dump` and the disk cache.
    pub resources: BTreeMap<String, Resource>,
}

/// A resource that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// The outcome of one response.
#[derive(Debug, Default)]
pub struct Applied {
    pub rejected: Vec<Rejected>,
}

/// Every kind as received, and the [`Mesh`] converted from it.
#[derive(Debug, Default)]
pub struct State {
    kinds: PerKind<KindState>,
    mesh: Mesh,
}

impl State {
    pub fn new() -> Self {
        State::default()
    }

    /// A state for `--discovery-mode on-demand`: endpoints are known per name, once answered.
    pub fn on_demand() -> Self {
        let mut st = State::new();
        st.mesh.answered = Some(BTreeSet::new());
        st
    }

    /// What the tables are compiled from.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Whether the endpoints of `name` ("service.namespace") are known: always, unless on
    /// demand and never answered.
    pub fn endpoints_known(&self, name: &str) -> bool {
        self.mesh.endpoints_known(name)
    }

    /// On demand: the names answered so far (saved with the tables, so that a restart
    /// subscribes to them again). Empty otherwise.
    pub fn answered(&self) -> Vec<String> {
        self.mesh
            .answered
            .iter()
            .flat_map(|a| a.iter().cloned())
            .collect()
    }

    /// On demand: records names as answered (loaded from the saved state).
    pub fn mark_answered(&mut self, names: impl IntoIterator<Item = String>) {
        if let Some(a) = self.mesh.answered.as_mut() {
            a.extend(names);
        }
    }

    pub fn kind(&self, type_url: &str) -> Option<&KindState> {
        ResourceKind::from_type_url(type_url).map(|k| &self.kinds[k])
    }

    /// Every kind received at least once: the first full sync is done.
    pub fn synced(&self) -> bool {
        self.kinds.values().all(|k| k.received)
    }

    /// Applies one response. `full`: it is the complete state of its kind (the first response
    /// of a stream, or a saved state): names it does not mention are removed. Otherwise it is
    /// incremental: `resources` are added or changed, `removed_resources` removed.
    ///
    /// Returns `Err` (and changes nothing) for a `type_url` the proxy does not know.
    pub fn apply(&mut self, resp: &DiscoveryResponse, full: bool) -> Result<Applied, String> {
        let kind = ResourceKind::from_type_url(&resp.type_url)
            .ok_or_else(|| format!("unknown type_url {:?}", resp.type_url))?;
        let mut applied = Applied::default();
        let mut removed: Vec<String> = resp.removed_resources.clone();
        if full {
            let mentioned: std::collections::HashSet<&str> =
                resp.resources.iter().map(|r| r.name.as_str()).collect();
            removed.extend(
                self.kinds[kind]
                    .resources
                    .keys()
                    .filter(|n| !mentioned.contains(n.as_str()))
                    .cloned(),
            );
        }
        for name in &removed {
            self.remove(kind, name);
        }
        if kind == ResourceKind::Endpoints {
            // Every name a response mentions is answered, even a rejected one (it keeps its
            // last good version, or none): nothing is left to wait for.
            let mentioned = resp.resources.iter().map(|r| &r.name);
            self.mark_answered(mentioned.chain(&resp.removed_resources).cloned());
        }
        // VIP:port claims of the services kept so far, to refuse a service that takes
        // another's address (the one already serving keeps it).
        let mut claims = (kind == ResourceKind::Services).then(|| self.claims());
        for res in &resp.resources {
            if let Err(reason) = self.accept(kind, res, claims.as_mut()) {
                applied.rejected.push(Rejected {
                    name: res.name.clone(),
                    reason,
                });
            }
        }
        let k = &mut self.kinds[kind];
        k.received = true;
        if applied.rejected.is_empty() {
            k.version = resp.version_info.clone();
        }
        Ok(applied)
    }

    fn remove(&mut self, kind: ResourceKind, name: &str) {
        self.kinds[kind].resources.remove(name);
        match kind {
            ResourceKind::Services => drop(self.mesh.services.remove(name)),
            ResourceKind::Endpoints => drop(self.mesh.endpoints.remove(name)),
            ResourceKind::Routes => drop(self.mesh.routes.remove(name)),
            ResourceKind::Policies => drop(self.mesh.policies.remove(name)),
        }
    }

    /// Checks and stores one resource, or says why it cannot be used.
    fn accept(
        &mut self,
        kind: ResourceKind,
        res: &Resource,
        claims: Option<&mut HashMap<SocketAddr, String>>,
    ) -> Result<(), String> {
        if res.name.is_empty() {
            return Err("resource without a name".into());
        }
        let body = res.kind.as_ref().ok_or("resource without a body")?;
        match (kind, body) {
            (ResourceKind::Services, Kind::Service(s)) => {
                let def = convert::service(s)?;
                if let Some(claims) = claims {
                    let mine: Vec<SocketAddr> = addrs(&def).collect();
                    if let Some((addr, owner)) = mine.iter().find_map(|a| {
                        claims
                            .get(a)
                            .filter(|owner| **owner != res.name)
                            .map(|o| (a, o))
                    }) {
                        return Err(format!("{addr} is already served by {owner}"));
                    }
                    claims.retain(|_, owner| *owner != res.name);
                    claims.extend(mine.into_iter().map(|a| (a, res.name.clone())));
                }
                self.mesh.services.insert(res.name.clone(), def);
            }
            (ResourceKind::Endpoints, Kind::Endpoints(e)) => {
                let eps = convert::endpoints(e)?;
                self.mesh.endpoints.insert(res.name.clone(), eps);
            }
            (ResourceKind::Routes, Kind::Route(r)) => {
                let def = crate::route::RouteDef::from_proto(&res.name, r)?;
                self.mesh.routes.insert(res.name.clone(), Arc::new(def));
            }
            (ResourceKind::Policies, Kind::Policy(p)) => {
                let def = crate::policy::PolicyDef::from_proto(p)?;
                self.mesh.policies.insert(res.name.clone(), Arc::new(def));
            }
            _ => return Err(format!("not a resource of kind {kind}")),
        }
        self.kinds[kind]
            .resources
            .insert(res.name.clone(), res.clone());
        Ok(())
    }

    fn claims(&self) -> HashMap<SocketAddr, String> {
        self.mesh
            .services
            .iter()
            .flat_map(|(name, s)| addrs(s).map(move |a| (a, name.clone())))
            .collect()
    }

    /// `/config_dump`'s view: per kind, the accepted version and every resource in use.
    pub fn dump(&self) -> Value {
        let kinds: serde_json::Map<String, Value> = self
            .kinds
            .iter()
            .map(|(kind, k)| {
                let resources: Vec<Value> = k
                    .resources
                    .values()
                    .map(|r| {
                        let body = r.kind.as_ref().map_or(Value::Null, convert::dump);
                        json!({"name": r.name, "version": r.version, "resource": body})
                    })
                    .collect();
                (
                    kind.type_url().to_owned(),
                    json!({"version": k.version, "resources": resources}),
                )
            })
            .collect();
        Value::Object(kinds)
    }

    /// The whole state, one full response per kind (for the disk cache).
    pub fn snapshot(&self) -> Vec<DiscoveryResponse> {
        self.kinds
            .iter()
            .filter(|(_, k)| k.received)
            .map(|(kind, k)| DiscoveryResponse {
                type_url: kind.type_url().to_owned(),
                version_info: k.version.clone(),
                nonce: String::new(),
                resources: k.resources.values().cloned().collect(),
                removed_resources: Vec::new(),
                continues: false,
            })
            .collect()
    }
}

fn addrs(s: &ServiceDef) -> impl Iterator<Item = SocketAddr> + '_ {
    s.vips
        .iter()
        .flat_map(|vip| s.ports.iter().map(|p| SocketAddr::new(*vip, p.port)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use muon_api::v1::{self, kinds};

    pub fn service(name: &str, vip: &str, port: u32) -> Resource {
        Resource {
            name: format!("{name}.shop"),
            version: "1".into(),
            kind: Some(Kind::Service(v1::Service {
                traffic: None,
                name: name.into(),
                namespace: "shop".into(),
                vips: vec![vip.into()],
                ports: vec![v1::ServicePort {
                    port,
                    target_port: port,
                    protocol: "tcp".into(),
                    name: String::new(),
                }],
            })),
        }
    }

    pub fn endpoints(name: &str, addrs: &[&str]) -> Resource {
        Resource {
            name: format!("{name}.shop"),
            version: "1".into(),
            kind: Some(Kind::Endpoints(v1::Endpoints {
                service: name.into(),
                namespace: "shop".into(),
                endpoints: addrs
                    .iter()
                    .map(|a| v1::Endpoint {
                        address: (*a).into(),
                        workload: format!("{name}-{a}"),
                        ready: true,
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    pub fn response(type_url: &str, version: &str, resources: Vec<Resource>) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: type_url.into(),
            version_info: version.into(),
            nonce: format!("n-{version}"),
            resources,
            removed_resources: vec![],
            continues: false,
        }
    }

    #[test]
    fn a_bad_resource_is_rejected_and_its_last_good_version_keeps_serving() {
        let mut st = State::new();
        let r = st
            .apply(
                &response(
                    kinds::SERVICES,
                    "1",
                    vec![
                        service("web", "198.19.0.1", 80),
                        service("db", "198.19.0.2", 5432),
                    ],
                ),
                true,
            )
            .unwrap();
        assert!(r.rejected.is_empty());
        assert_eq!(st.kind(kinds::SERVICES).unwrap().version, "1");

        // v2: web gets an unparsable VIP, db a port 0, api is new and fine, and thief
        // claims the address db still serves.
        let thief = service("thief", "198.19.0.2", 5432);
        let r = st
            .apply(
                &response(
                    kinds::SERVICES,
                    "2",
                    vec![
                        service("web", "bogus", 80),
                        service("db", "198.19.0.2", 0),
                        service("api", "198.19.0.3", 80),
                        thief,
                    ],
                ),
                false,
            )
            .unwrap();
        let names: Vec<&str> = r.rejected.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["web.shop", "db.shop", "thief.shop"]);
        assert!(r.rejected[0].reason.contains("bogus"));
        assert!(r.rejected[2].reason.contains("already served by db.shop"));
        // The version of a partly rejected response is not recorded.
        assert_eq!(st.kind(kinds::SERVICES).unwrap().version, "1");
        let names: Vec<&str> = st
            .mesh()
            .services
            .values()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["api", "db", "web"]);
        assert_eq!(
            st.mesh().services["web.shop"].vips[0].to_string(),
            "198.19.0.1"
        );

        // Incremental removal, then a full state that no longer mentions api.
        let mut rm = response(kinds::SERVICES, "3", vec![]);
        rm.removed_resources = vec!["web.shop".into()];
        st.apply(&rm, false).unwrap();
        assert_eq!(st.mesh().services.len(), 2);
        st.apply(
            &response(
                kinds::SERVICES,
                "4",
                vec![service("db", "198.19.0.2", 5432)],
            ),
            true,
        )
        .unwrap();
        assert_eq!(st.mesh().services.len(), 1);
        assert_eq!(st.kind(kinds::SERVICES).unwrap().version, "4");
    }

    #[test]
    fn sync_needs_every_kind_and_wrong_kinds_are_rejected() {
        let mut st = State::new();
        assert!(st.apply(&response("clusters", "1", vec![]), true).is_err());
        st.apply(&response(kinds::SERVICES, "1", vec![]), true)
            .unwrap();
        let r = st
            .apply(
                &response(
                    kinds::ENDPOINTS,
                    "1",
                    vec![service("web", "198.19.0.1", 80)],
                ),
                true,
            )
            .unwrap();
        assert_eq!(r.rejected.len(), 1);
        let r = st
            .apply(
                &response(
                    kinds::ENDPOINTS,
                    "2",
                    vec![endpoints("web", &["198.18.0.300"])],
                ),
                false,
            )
            .unwrap();
        assert!(r.rejected[0].reason.contains("198.18.0.300"));
        assert!(!st.synced());
        st.apply(&response(kinds::ROUTES, "1", vec![]), true)
            .unwrap();
        st.apply(&response(kinds::POLICIES, "1", vec![]), true)
            .unwrap();
        assert!(st.synced());
        assert_eq!(st.snapshot().len(), 4);
        assert!(
            st.endpoints_known("anything.shop"),
            "all mode knows every name"
        );
    }

    fn policy(name: &str, principal: &str) -> Resource {
        Resource {
            name: format!("authz/{name}.shop"),
            version: "1".into(),
            kind: Some(Kind::Policy(v1::Policy {
                name: name.into(),
                namespace: "shop".into(),
                kind: Some(v1::policy::Kind::Authorization(v1::AuthorizationPolicy {
                    selector: None,
                    action: v1::authorization_policy::Action::Allow.into(),
                    rules: vec![v1::AuthorizationRule {
                        from: vec![v1::AuthorizationSource {
                            principals: vec![principal.into()],
                            ..Default::default()
                        }],
                        to: vec![],
                    }],
                })),
                workloads: vec![],
                all_workloads: true,
            })),
        }
    }

    #[test]
    fn policies_are_checked_kept_by_name_and_removed() {
        let mut st = State::new();
        let r = st
            .apply(
                &response(
                    kinds::POLICIES,
                    "1",
                    vec![
                        policy("callers", "cluster.local/ns/shop/sa/orders"),
                        policy("bad", "orders"),
                    ],
                ),
                true,
            )
            .unwrap();
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].name, "authz/bad.shop");
        assert!(
            r.rejected[0].reason.contains("is not a principal"),
            "{}",
            r.rejected[0].reason
        );
        let names: Vec<&str> = st.mesh().policies.keys().map(String::as_str).collect();
        assert_eq!(names, ["authz/callers.shop"]);
        assert_eq!(
            &*st.mesh().policies["authz/callers.shop"].name,
            "shop/callers"
        );
        let dump = st.dump();
        let dumped = &dump["policies"]["resources"][0]["resource"];
        assert_eq!(dumped["policy"]["action"], "ALLOW", "{dumped}");
        let mut rm = response(kinds::POLICIES, "2", vec![]);
        rm.removed_resources = vec!["authz/callers.shop".into()];
        st.apply(&rm, false).unwrap();
        assert!(st.mesh().policies.is_empty());
    }

    #[test]
    fn on_demand_endpoints_are_known_once_answered_even_as_removed() {
        let mut st = State::on_demand();
        assert!(!st.endpoints_known("web.shop"));
        st.apply(&response(kinds::ENDPOINTS, "1", vec![]), true)
            .unwrap();
        assert!(!st.endpoints_known("web.shop"));
        st.apply(
            &response(
                kinds::ENDPOINTS,
                "2",
                vec![endpoints("web", &["198.18.0.2"])],
            ),
            false,
        )
        .unwrap();
        let mut gone = response(kinds::ENDPOINTS, "3", vec![]);
        gone.removed_resources = vec!["gone.shop".into()];
        st.apply(&gone, false).unwrap();
        assert!(st.endpoints_known("web.shop"));
        assert!(st.endpoints_known("gone.shop"));
        assert!(!st.endpoints_known("db.shop"));
        assert_eq!(st.answered(), ["gone.shop", "web.shop"]);
        // A full state that no longer mentions web removes its endpoints; web stays
        // answered (its endpoints are now known to be none).
        st.apply(&response(kinds::ENDPOINTS, "4", vec![]), true)
            .unwrap();
        assert!(st.endpoints_known("web.shop"));
    }
}
