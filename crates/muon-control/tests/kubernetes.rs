//! The Kubernetes source against a small fake API server on loopback that answers lists and
//! watches (ADDED / MODIFIED / DELETED / BOOKMARK lines, and an `ERROR` 410 Gone) the way
//! the API server does, from the recorded objects under `fixtures/kubernetes/`. No real API
//! server runs here.
//!
//! The fixtures describe the same mesh as `fixtures/kubernetes/topology.yaml`; the tables the
//! source produces must equal what the lab registers for that topology.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use muon_api::v1;
use muon_api::v1::certify_request::Credential;
use muon_api::v1::identity_client::IdentityClient;
use muon_api::v1::kinds::ResourceKind;
use muon_control::kubernetes::ApiServer;
use muon_control::registry::Registry;
use muon_control::{Config, Server};
use muon_core::resource::{Kind, Object, ObjectKey, Spec};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(10);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kubernetes");

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const NODES: &str = "/api/v1/nodes";
const HTTPROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";

// ---------------------------------------------------------------------------------------------
// The fake API server

#[derive(Default)]
struct Collection {
    list_kind: String,
    api_version: String,
    /// "namespace/name" → object.
    items: BTreeMap<String, Value>,
    watchers: Vec<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    lists: usize,
    /// The query of every watch request, in order.
    watches: Vec<String>,
    /// While true, list requests wait.
    hold: Option<watch::Receiver<bool>>,
}

#[derive(Default)]
struct State {
    /// The cluster's resource version, bumped by every change.
    rv: u64,
    collections: HashMap<String, Collection>,
    /// Secrets and ConfigMaps by "plural/namespace/name".
    stored: BTreeMap<String, Value>,
    /// Every Secret or ConfigMap request: ("secrets", "GET ns/name 404"), ...
    requests: Vec<(String, String)>,
    /// Two replicas race: GETs answer 404 until two creates were attempted, so the second
    /// replica's create meets the first's Secret (409).
    secret_race: bool,
    secret_creates: usize,
    /// TokenReview: token → (its audience, its user).
    tokens: HashMap<String, (String, String)>,
    /// The spec of every TokenReview, in order.
    reviews: Vec<Value>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

fn item_key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl FakeApi {
    /// Serves `path` with the items of a recorded list (a `kubectl get -o json` answer).
    fn serve(&self, path: &str, list: Value) {
        let mut st = self.0.lock().unwrap();
        let c = st.collections.entry(path.to_string()).or_default();
        c.list_kind = list["kind"].as_str().unwrap().to_string();
        c.api_version = list["apiVersion"].as_str().unwrap().to_string();
        for o in list["items"].as_array().unwrap() {
            c.items.insert(item_key(o), o.clone());
        }
        let rv: u64 = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        st.rv = st.rv.max(rv);
    }

    fn serve_file(&self, path: &str, file: &str) {
        let text = std::fs::read_to_string(Path::new(FIXTURES).join(file)).unwrap();
        self.serve(path, serde_json::from_str(&text).unwrap());
    }

    /// Sends `line` to every open watch of `path`.
    fn send(c: &mut Collection, line: Value) {
        let mut bytes = serde_json::to_vec(&line).unwrap();
        bytes.push(b'\n');
        let bytes = Bytes::from(bytes);
        c.watchers
            .retain(|w| w.try_send(Ok(Frame::data(bytes.clone()))).is_ok());
    }

    /// Adds or changes an object, telling the watches (ADDED or MODIFIED).
    fn put(&self, path: &str, mut o: Value) {
        let mut st = self.0.lock().unwrap();
        st.rv += 1;
        o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let c = st.collections.get_mut(path).unwrap();
        let kind = if c.items.insert(item_key(&o), o.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        Self::send(c, json!({"type": kind, "object": o}));
    }

    /// Deletes an object; with `tell`, the watches hear of it (DELETED), else only a relist
    /// shows it (a deletion missed while a watch was down).
    fn delete(&self, path: &str, key: &str, tell: bool) {
        let mut st = self.0.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        let mut o = c.items.remove(key).unwrap();
        if tell {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            Self::send(c, json!({"type": "DELETED", "object": o}));
        }
    }

    /// A BOOKMARK at a new resource version, then the watch ends as the API server's do at
    /// their timeout: the client must watch again from the bookmark.
    fn bookmark_and_close(&self, path: &str) -> String {
        let mut st = self.0.lock().unwrap();
        st.rv += 1;
        let rv = st.rv.to_string();
        let c = st.collections.get_mut(path).unwrap();
        let (api_version, kind) = (
            c.api_version.clone(),
            c.list_kind.trim_end_matches("List").to_string(),
        );
        Self::send(
            c,
            json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": rv}}}),
        );
        c.watchers.clear();
        rv
    }

    /// The watches of `path` fail as after an etcd compaction: `ERROR` with a 410 Gone
    /// Status, and the stream ends; the client must list again.
    fn expire(&self, path: &str) {
        let mut st = self.0.lock().unwrap();
        let c = st.collections.get_mut(path).unwrap();
        Self::send(
            c,
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                   "status": "Failure", "message": "too old resource version: 1000 (1010)",
                   "reason": "Expired", "code": 410}}),
        );
        c.watchers.clear();
    }

    /// Holds list requests of `path` until the returned sender says `false`.
    fn hold_lists(&self, path: &str) -> watch::Sender<bool> {
        let (tx, rx) = watch::channel(true);
        self.0
            .lock()
            .unwrap()
            .collections
            .get_mut(path)
            .unwrap()
            .hold = Some(rx);
        tx
    }

    fn lists(&self, path: &str) -> usize {
        self.0.lock().unwrap().collections[path].lists
    }

    fn watches(&self, path: &str) -> Vec<String> {
        self.0.lock().unwrap().collections[path].watches.clone()
    }

    /// A token TokenReview knows: valid for `audience`, naming `user`.
    fn token(&self, token: &str, audience: &str, user: &str) {
        self.0
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_string(), (audience.to_string(), user.to_string()));
    }

    /// Secret GETs answer 404 until two creates were attempted (see `secret_race`).
    fn race_for_secrets(&self) {
        self.0.lock().unwrap().secret_race = true;
    }

    /// The requests for `plural` ("secrets", "configmaps"), in order.
    fn requests(&self, plural: &str) -> Vec<String> {
        let st = self.0.lock().unwrap();
        st.requests
            .iter()
            .filter(|(p, _)| p == plural)
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn secret_requests(&self) -> Vec<String> {
        self.requests("secrets")
    }

    fn stored(&self, plural: &str, key: &str) -> Option<Value> {
        let st = self.0.lock().unwrap();
        st.stored.get(&format!("{plural}/{key}")).cloned()
    }

    fn stored_secret(&self, key: &str) -> Option<Value> {
        self.stored("secrets", key)
    }

    /// Stores a ConfigMap as if someone had created it.
    fn put_configmap(&self, key: &str, o: Value) {
        let mut st = self.0.lock().unwrap();
        st.stored.insert(format!("configmaps/{key}"), o);
    }

    fn reviews(&self) -> Vec<Value> {
        self.0.lock().unwrap().reviews.clone()
    }

    fn review(&self, body: &[u8]) -> hyper::Response<BoxBody<Bytes, Infallible>> {
        let review: Value = serde_json::from_slice(body).unwrap();
        let spec = review["spec"].clone();
        let mut st = self.0.lock().unwrap();
        st.reviews.push(spec.clone());
        let asked: Vec<String> =
            serde_json::from_value(spec["audiences"].clone()).unwrap_or_default();
        // As the API server: a token for none of the audiences asked for is not authenticated.
        let status = match st.tokens.get(spec["token"].as_str().unwrap_or("")) {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some((audience, _)) if !asked.contains(audience) => json!({"authenticated": false,
                "error": format!("token audiences [{audience:?}] is invalid for the target audiences {asked:?}")}),
            Some((audience, user)) => json!({"authenticated": true, "audiences": [audience],
                "user": {"username": user, "uid": "4a1c7d2e", "groups": ["system:serviceaccounts"]}}),
        };
        let answer = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": null}, "spec": spec, "status": status});
        respond(201, Full::new(Bytes::from(answer.to_string())).boxed())
    }

    /// GET /api/v1/namespaces/NS/PLURAL/NAME, POST /api/v1/namespaces/NS/PLURAL and PUT
    /// /api/v1/namespaces/NS/PLURAL/NAME, for secrets and configmaps.
    fn namespaced(
        &self,
        method: &hyper::Method,
        rest: &str,
        body: &[u8],
    ) -> hyper::Response<BoxBody<Bytes, Infallible>> {
        let mut st = self.0.lock().unwrap();
        let status = |code: u16, reason: &str, message: String| {
            let s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": reason, "code": code});
            respond(code, Full::new(Bytes::from(s.to_string())).boxed())
        };
        let mut parts = rest.splitn(3, '/');
        let ns = parts.next().unwrap_or("").to_string();
        let plural = parts.next().unwrap_or("").to_string();
        let name = parts.next().unwrap_or("").to_string();
        let log = |st: &mut State, line: String| st.requests.push((plural.clone(), line));
        if method == hyper::Method::GET && !name.is_empty() {
            let key = format!("{ns}/{name}");
            let hidden = plural == "secrets" && st.secret_race && st.secret_creates < 2;
            let found = st.stored.get(&format!("{plural}/{key}")).cloned();
            return match found.filter(|_| !hidden) {
                Some(o) => {
                    log(&mut st, format!("GET {key} 200"));
                    respond(200, Full::new(Bytes::from(o.to_string())).boxed())
                }
                None => {
                    log(&mut st, format!("GET {key} 404"));
                    status(404, "NotFound", format!("{plural} \"{name}\" not found"))
                }
            };
        }
        if (method == hyper::Method::POST && name.is_empty())
            || (method == hyper::Method::PUT && !name.is_empty())
        {
            let mut o: Value = serde_json::from_slice(body).unwrap();
            let name = o["metadata"]["name"].as_str().unwrap().to_string();
            let key = format!("{ns}/{name}");
            let exists = st.stored.contains_key(&format!("{plural}/{key}"));
            if method == hyper::Method::POST {
                if plural == "secrets" {
                    st.secret_creates += 1;
                }
                if exists {
                    log(&mut st, format!("POST {key} 409"));
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{plural} \"{name}\" already exists"),
                    );
                }
            } else if !exists {
                log(&mut st, format!("PUT {key} 404"));
                return status(404, "NotFound", format!("{plural} \"{name}\" not found"));
            }
            st.rv += 1;
            o["metadata"]["namespace"] = json!(ns);
            o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.stored.insert(format!("{plural}/{key}"), o.clone());
            let code = if method == hyper::Method::POST {
                201
            } else {
                200
            };
            log(&mut st, format!("{method} {key} {code}"));
            return respond(code, Full::new(Bytes::from(o.to_string())).boxed());
        }
        log(&mut st, format!("{method} {ns}/{name} 405"));
        status(405, "MethodNotAllowed", format!("{method} is not served"))
    }

    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<BoxBody<Bytes, Infallible>> {
        let path = req.uri().path().to_string();
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            return self.review(&body);
        }
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/") {
            if rest.contains("/secrets") || rest.contains("/configmaps") {
                let method = req.method().clone();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                return self.namespaced(&method, rest, &body);
            }
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let is_watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let hold = {
            let mut st = self.0.lock().unwrap();
            let rv = st.rv;
            let Some(c) = st.collections.get_mut(&path) else {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "the server could not find the requested resource",
                    "reason": "NotFound", "code": 404});
                return respond(404, Full::new(Bytes::from(status.to_string())).boxed());
            };
            if is_watch {
                c.watches.push(query);
                let (tx, rx) = mpsc::channel(64);
                // Every watch starts with a bookmark at the current version.
                let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": c.api_version,
                    "kind": c.list_kind.trim_end_matches("List"), "metadata": {"resourceVersion": rv.to_string()}}});
                let mut line = serde_json::to_vec(&bookmark).unwrap();
                line.push(b'\n');
                let _ = tx.try_send(Ok(Frame::data(Bytes::from(line))));
                c.watchers.push(tx);
                return respond(
                    200,
                    BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))),
                );
            }
            c.lists += 1;
            c.hold.clone()
        };
        if let Some(mut hold) = hold {
            let _ = hold.wait_for(|held| !*held).await;
        }
        let st = self.0.lock().unwrap();
        let c = &st.collections[&path];
        let list = json!({
            "apiVersion": c.api_version, "kind": c.list_kind,
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": c.items.values().collect::<Vec<_>>(),
        });
        respond(200, Full::new(Bytes::from(list.to_string())).boxed())
    }

    /// Serves on 127.0.0.1 until the runtime ends; returns the URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }
}

fn respond(
    status: u16,
    body: BoxBody<Bytes, Infallible>,
) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// The fake cluster: the recorded objects, and empty lists of every other resource the
/// source watches.
fn fake_cluster() -> FakeApi {
    let api = FakeApi::default();
    api.serve_file(SERVICES, "services.json");
    api.serve_file(SLICES, "endpointslices.json");
    api.serve_file(PODS, "pods.json");
    api.serve_file(NODES, "nodes.json");
    api.serve_file(HTTPROUTES, "httproutes.json");
    let empty = |api_version: &str, kind: &str| {
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": {"resourceVersion": "1000"}, "items": []})
    };
    api.serve(
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        empty("gateway.networking.k8s.io/v1", "GRPCRoute"),
    );
    api.serve("/api/v1/namespaces", empty("v1", "Namespace"));
    for (kind, group, version, plural) in muon_control::kubernetes::custom_resources() {
        api.serve(
            &format!("/apis/{group}/{version}/{plural}"),
            empty(&format!("{group}/{version}"), kind.as_str()),
        );
    }
    api
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn until<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the registry's workloads are exactly `want`.
async fn until_workloads(registry: &Registry, want: &BTreeSet<ObjectKey>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let have: BTreeSet<ObjectKey> = objects(registry, Kind::Workload)
            .await
            .into_keys()
            .collect();
        if &have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workloads are {have:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn objects(registry: &Registry, kind: Kind) -> BTreeMap<ObjectKey, (Object, u64)> {
    registry
        .list(Some(kind), None)
        .await
        .0
        .into_iter()
        .map(|s| (s.object.key(), (s.object, s.generation)))
        .collect()
}

/// Every resource of a snapshot without its version: what sidecars are sent.
fn tables(registry: &Registry) -> BTreeMap<(usize, String), String> {
    let snap = registry.snapshot();
    let mut out = BTreeMap::new();
    for (i, kind) in ResourceKind::ALL.into_iter().enumerate() {
        for (name, r) in &snap.kinds[kind] {
            out.insert((i, name.clone()), format!("{:?}", r.proto.kind));
        }
    }
    out
}

/// What the lab registers for `topology.yaml`, plus the one mesh route of the fixtures.
fn lab_objects() -> Vec<Object> {
    let file = Path::new(FIXTURES).join("topology.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let topo = muon_lab::topology::Topology::parse("topology.yaml", &text).unwrap();
    let opts = muon_lab::lab::UpOptions {
        topology: file,
        name: None,
        bin_dir: None,
        ready_timeout: Duration::from_secs(1),
        supervisor: false,
    };
    let lab = muon_lab::lab::plan("kube", &topo, false, &opts).unwrap();
    let mut out: Vec<Object> = muon_lab::control::objects(&lab, &topo)
        .iter()
        .enumerate()
        .map(|(i, o)| muon_control::convert::object_from_proto(o, i).unwrap())
        .collect();
    out.push(
        Object::from_json(
            &json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "web-canary", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                    "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                               "backendRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80, "weight": 1}]}]
                }
            }),
            0,
        )
        .unwrap(),
    );
    out
}

async fn kubernetes_server(dir: &Path, url: String) -> Server {
    let mut config = Config::for_tests(dir);
    config.kubernetes = Some(ApiServer::Url(url));
    Server::start(&config).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_objects_become_the_tables_the_lab_registers_for_the_same_topology() {
    let api = fake_cluster();
    let url = api.start().await;
    let kube_dir = tempfile::tempdir().unwrap();
    let kube = kubernetes_server(kube_dir.path(), url).await;
    let lab_dir = tempfile::tempdir().unwrap();
    let lab = Server::start(&Config::for_tests(lab_dir.path()))
        .await
        .unwrap();
    let expected = lab_objects();
    let count = expected.len();
    lab.registry.apply(expected, false).await.unwrap();

    until("both snapshots", || {
        let n = |s: &Server| s.registry.snapshot().kinds[ResourceKind::Services].len();
        n(&kube) == 2 && n(&lab) == 2 && tables(&kube.registry).len() == tables(&lab.registry).len()
    })
    .await;
    // The same objects: Services, Workloads (identity, locality, readiness, meshed) and the
    // mesh route; the headless Service, the finished pod and the Gateway's route are left out.
    let (got, _) = kube.registry.list(None, None).await;
    let (want, _) = lab.registry.list(None, None).await;
    let got: Vec<String> = got.iter().map(|s| s.object.to_json().to_string()).collect();
    let want: Vec<String> = want
        .iter()
        .map(|s| s.object.to_json().to_string())
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), count);
    // And so the same tables sidecars are sent.
    assert_eq!(tables(&kube.registry), tables(&lab.registry));

    let workloads = objects(&kube.registry, Kind::Workload).await;
    let web0 = &workloads[&ObjectKey {
        kind: Kind::Workload,
        namespace: "shop".into(),
        name: "web-0".into(),
    }]
        .0;
    let Spec::Workload(w) = &web0.spec else {
        panic!()
    };
    assert_eq!(
        (
            w.address.as_str(),
            w.service_account.as_str(),
            w.locality.zone.as_str(),
            w.locality.region.as_str(),
            w.meshed
        ),
        ("198.18.0.3", "web", "zone-a", "region-1", true)
    );
    let endpoints = format!(
        "{:?}",
        kube.registry.snapshot().kinds[ResourceKind::Endpoints]
    );
    assert!(
        endpoints.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{endpoints}"
    );
    // The named target port came from the slice's ports.
    let services = objects(&kube.registry, Kind::Service).await;
    let api_svc = services
        .values()
        .find(|(o, _)| o.metadata.name == "api")
        .unwrap();
    let Spec::Service(s) = &api_svc.0.spec else {
        panic!()
    };
    assert_eq!(
        (
            s.ports.len(),
            s.ports[0].target_port(),
            s.ports[0].protocol.as_deref()
        ),
        (1, 9090, Some("grpc"))
    );
    assert!(
        muon_control::model::Source::Kubernetes == kube.registry.list(None, None).await.0[0].source
    );

    kube.shutdown().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_slice_touches_only_its_workloads_and_a_410_relists_while_the_last_state_serves()
{
    let api = fake_cluster();
    let url = api.start().await;
    let dir = tempfile::tempdir().unwrap();
    let kube = kubernetes_server(dir.path(), url).await;
    let registry = kube.registry.clone();
    let key = |name: &str| ObjectKey {
        kind: Kind::Workload,
        namespace: "shop".into(),
        name: name.into(),
    };
    let mut names = BTreeSet::new();
    for n in ["web-0", "web-1", "api", "client"] {
        names.insert(key(n));
    }
    until_workloads(&registry, &names).await;
    assert!(
        api.watches(SLICES)[0].contains("allowWatchBookmarks=true"),
        "{:?}",
        api.watches(SLICES)
    );

    // MODIFIED: web-1 is no longer ready in the web Service's slice.
    let mut events = registry.events();
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("endpointslices.json")).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let mut slice = list["items"][0].clone();
    assert_eq!(slice["metadata"]["name"], "web-7xk2p");
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    // The headless Service's slice still lists web-1 as ready: make it agree.
    let mut peers = list["items"][1].clone();
    peers["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    api.put(SLICES, slice);
    api.put(SLICES, peers);
    let event = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.stored.object.key(), key("web-1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(events.try_recv().is_err(), "only web-1 changed");
    let workloads = objects(&registry, Kind::Workload).await;
    let generations: Vec<(&str, u64)> = workloads
        .iter()
        .map(|(k, (_, g))| (k.name.as_str(), *g))
        .collect();
    assert_eq!(
        generations,
        [("api", 1), ("client", 1), ("web-0", 1), ("web-1", 2)]
    );
    let Spec::Workload(w) = &workloads[&key("web-1")].0.spec else {
        panic!()
    };
    assert!(!w.ready);

    // BOOKMARK, then the watch ends: the source watches again from the bookmark's version.
    let watches = api.watches(PODS).len();
    let rv = api.bookmark_and_close(PODS);
    until("a new pod watch", || api.watches(PODS).len() > watches).await;
    let last = api.watches(PODS).last().cloned().unwrap();
    assert!(last.contains(&format!("resourceVersion={rv}")), "{last}");

    // 410 Gone: the client pod was deleted while the watch was down; the relist (held for a
    // moment) shows it. Until the relist completes, the last state keeps serving.
    let release = api.hold_lists(PODS);
    let lists = api.lists(PODS);
    api.delete(PODS, "shop/client", false);
    api.expire(PODS);
    until("the relist", || api.lists(PODS) > lists).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(objects(&registry, Kind::Workload)
        .await
        .contains_key(&key("client")));
    release.send_replace(false);
    names.remove(&key("client"));
    until_workloads(&registry, &names).await;
    // Nothing else changed with the relist.
    let generations: Vec<(String, u64)> = objects(&registry, Kind::Workload)
        .await
        .iter()
        .map(|(k, (_, g))| (k.name.clone(), *g))
        .collect();
    assert_eq!(
        generations,
        [
            ("api".to_string(), 1),
            ("web-0".into(), 1),
            ("web-1".into(), 2)
        ]
    );
    kube.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The CA in Kubernetes: TokenReview and the root's Secret

const SECRET: &str = "muon-system/muon-ca";

/// A fake cluster that knows four tokens: shop/web's for `muon-ca`, shop/web's default one
/// (the API server's audience), a user's, and none for "forged".
fn cluster_with_tokens() -> FakeApi {
    let api = fake_cluster();
    api.token("web-muon-ca", "muon-ca", "system:serviceaccount:shop:web");
    api.token(
        "web-default",
        "https://kubernetes.default.svc.cluster.local",
        "system:serviceaccount:shop:web",
    );
    api.token("alice", "muon-ca", "alice");
    api
}

async fn certify(server: &Server, token: &str) -> Result<v1::CertifyResponse, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect_timeout(WAIT);
    let channel = muon_api::connect::channel(endpoint, None).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    IdentityClient::new(channel)
        .certify(v1::CertifyRequest {
            csr_pem: csr,
            credential: Some(Credential::KubernetesToken(token.into())),
            ttl_seconds: 600,
        })
        .await
        .map(|r| r.into_inner())
}

/// The URI SANs of a PEM certificate.
fn uris(pem: &str) -> Vec<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

fn secret_field(secret: &Value, key: &str) -> String {
    use base64::Engine as _;
    let b64 = secret["data"][key].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_for_muon_ca_gets_its_identity_and_every_other_token_is_refused() {
    let api = cluster_with_tokens();
    let url = api.start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = kubernetes_server(dir.path(), url).await;

    let cert = certify(&server, "web-muon-ca").await.unwrap();
    assert_eq!(cert.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(
        uris(&cert.cert_chain_pem[0]),
        ["spiffe://cluster.local/ns/shop/sa/web"]
    );
    // The review asked for the token's audience `muon-ca`, and that only.
    let reviews = api.reviews();
    assert_eq!(
        reviews,
        [json!({"token": "web-muon-ca", "audiences": ["muon-ca"]})]
    );

    for (token, why) in [
        (
            "forged",
            "the Kubernetes token was not authenticated: invalid bearer token",
        ),
        (
            "web-default",
            "the Kubernetes token was not authenticated: token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences [\"muon-ca\"]",
        ),
        (
            "alice",
            "the Kubernetes token is \"alice\"'s, not a ServiceAccount's",
        ),
    ] {
        let err = certify(&server, token).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token}: {err}");
        assert_eq!(err.message(), why, "{token}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_for_the_ca_secret_all_sign_with_the_root_whose_create_won() {
    let api = cluster_with_tokens();
    api.race_for_secrets();
    let url = api.start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = kubernetes_server(dir_a.path(), url.clone()).await;
    let b = kubernetes_server(dir_b.path(), url.clone()).await;
    // Both found no Secret; a's create won, b's met it (409) and b read it: no update, ever.
    assert_eq!(
        api.secret_requests(),
        [
            format!("GET {SECRET} 404"),
            format!("POST {SECRET} 201"),
            format!("GET {SECRET} 404"),
            format!("POST {SECRET} 409"),
            format!("GET {SECRET} 200"),
        ]
    );

    // The Secret holds a's root, which both sign with; b's own root is not used.
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join("ca").join(file)).unwrap();
    let root_a = read(dir_a.path(), "root-cert.pem");
    assert_ne!(root_a, read(dir_b.path(), "root-cert.pem"));
    let secret = api.stored_secret(SECRET).unwrap();
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret_field(&secret, "ca.crt"), root_a);
    assert_eq!(
        secret_field(&secret, "ca.key"),
        read(dir_a.path(), "root-key.pem")
    );
    assert_eq!(read(dir_a.path(), "trust-bundle.pem"), root_a);
    assert_eq!(read(dir_b.path(), "trust-bundle.pem"), root_a);
    let from_a = certify(&a, "web-muon-ca").await.unwrap();
    let from_b = certify(&b, "web-muon-ca").await.unwrap();
    assert_eq!(from_a.trust_bundle_pem, std::slice::from_ref(&root_a));
    assert_eq!(from_b.trust_bundle_pem, std::slice::from_ref(&root_a));
    assert_eq!(from_b.cert_chain_pem.last(), Some(&root_a));
    {
        use rustls_pki_types::pem::PemObject;
        let der =
            |pem: &str| rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (root, leaf) = (der(&root_a), der(&from_b.cert_chain_pem[0]));
        let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert!(leaf.verify_signature(Some(root.public_key())).is_ok());
    }

    // A replica starting later reads the Secret and creates nothing.
    let dir_c = tempfile::tempdir().unwrap();
    let c = kubernetes_server(dir_c.path(), url).await;
    assert_eq!(
        api.secret_requests().last(),
        Some(&format!("GET {SECRET} 200"))
    );
    assert_eq!(api.secret_requests().len(), 6);
    assert_eq!(read(dir_c.path(), "trust-bundle.pem"), root_a);
    for s in [a, b, c] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_given_by_flags_that_differs_from_the_secrets_stops_the_start() {
    let api = cluster_with_tokens();
    let url = api.start().await;
    let dir_a = tempfile::tempdir().unwrap();
    let a = kubernetes_server(dir_a.path(), url.clone()).await;
    // Another mesh's root, from a control plane outside Kubernetes.
    let other = tempfile::tempdir().unwrap();
    Server::start(&Config::for_tests(other.path()))
        .await
        .unwrap()
        .shutdown()
        .await;
    let (dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_flags = |data: &Path, ca: &Path| {
        let mut config = Config::for_tests(data);
        config.kubernetes = Some(ApiServer::Url(url.clone()));
        config.ca_cert = Some(ca.join("ca/root-cert.pem"));
        config.ca_key = Some(ca.join("ca/root-key.pem"));
        config
    };
    let err = Server::start(&with_flags(dir_b.path(), other.path()))
        .await
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("the CA's Secret muon-system/muon-ca holds another CA than --ca-cert"),
        "{err}"
    );
    // The same CA as the Secret's, given by flags, is fine.
    let b = Server::start(&with_flags(dir_c.path(), dir_a.path()))
        .await
        .unwrap();
    for s in [a, b] {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_is_published_to_every_namespace_with_meshed_pods() {
    let api = cluster_with_tokens();
    // A stale bundle in a namespace that gets meshed pods later is replaced.
    api.put_configmap(
        "web/muon-ca-root",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "muon-ca-root", "namespace": "web", "resourceVersion": "7"},
               "data": {"ca.crt": "an old root"}}),
    );
    let url = api.start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = kubernetes_server(dir.path(), url).await;
    let bundle = std::fs::read_to_string(dir.path().join("ca/trust-bundle.pem")).unwrap();

    // shop has meshed pods (web-0, web-1, api): its ConfigMap is created, with the bundle
    // injection mounts as the sidecar's --ca-bundle.
    until("the shop ConfigMap", || {
        api.stored("configmaps", "shop/muon-ca-root").is_some()
    })
    .await;
    let cm = api.stored("configmaps", "shop/muon-ca-root").unwrap();
    assert_eq!(cm["data"], json!({"ca.crt": bundle.clone()}));
    assert_eq!(cm["metadata"]["name"], muon_inject::template::CA_CONFIGMAP);
    assert_eq!(
        api.requests("configmaps"),
        ["GET shop/muon-ca-root 404", "POST shop/muon-ca-root 201"]
    );

    // A meshed pod appears in another namespace: that namespace gets it too (replacing what
    // was there); a pod without the sidecar publishes nothing.
    let pods: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURES).join("pods.json")).unwrap(),
    )
    .unwrap();
    let template = |meshed: bool| {
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .chain(p["spec"]["initContainers"].as_array().into_iter().flatten())
                    .any(|c| c["name"] == "muon-proxy")
                    == meshed
            })
            .unwrap()
            .clone()
    };
    let mut plain = template(false);
    plain["metadata"]["namespace"] = json!("batch");
    api.put(PODS, plain);
    let mut meshed = template(true);
    meshed["metadata"]["namespace"] = json!("web");
    api.put(PODS, meshed);
    until("the web ConfigMap", || {
        api.stored("configmaps", "web/muon-ca-root").unwrap()["data"]["ca.crt"] == json!(bundle)
    })
    .await;
    assert_eq!(
        api.requests("configmaps"),
        [
            "GET shop/muon-ca-root 404",
            "POST shop/muon-ca-root 201",
            "GET web/muon-ca-root 200",
            "PUT web/muon-ca-root 200",
        ]
    );
    server.shutdown().await;
}

/// kube (and k8s-openapi) belong to the control plane: the sidecar never links them.
#[test]
fn kube_stays_out_of_muon_proxy() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "muon-proxy",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.lines().any(|l| l.starts_with("muon-proxy ")), "{tree}");
    let kube: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("kube") || l.starts_with("k8s-openapi "))
        .collect();
    assert!(kube.is_empty(), "muon-proxy depends on {kube:?}");
    // And the control plane does (so the check above looks at the right names).
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "muon-control",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
            "-i",
            "kube",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree -i kube: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
