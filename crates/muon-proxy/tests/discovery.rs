//! The discovery client against an in-process fake control plane: a small tonic server that
//! sends scripted responses and records every request (subscriptions, ACKs, NACKs). Real
//! gRPC over loopback, real proxy code: the client in-process for the data path
//! (`outbound::handle` to a virtual IP), and the real binary for readiness, the saved state
//! and `/config_dump`.

use arc_swap::ArcSwapOption;
use clap::Parser;
use muon_api::v1::discovery_server::{Discovery, DiscoveryServer};
use muon_api::v1::{self, kinds, resource::Kind, DiscoveryRequest, DiscoveryResponse, Resource};
use muon_proxy::accesslog::Record;
use muon_proxy::config::{Args, Config};
use muon_proxy::discovery::{self, Publisher};
use muon_proxy::metrics::Metrics;
use muon_proxy::table::SharedTable;
use muon_proxy::{outbound, Direction, Outcome, Shared};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

// ---------------------------------------------------------------------------------------
// The fake control plane.

type Outbox = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// One discovery stream as the fake sees it.
struct Conn {
    requests: mpsc::UnboundedReceiver<DiscoveryRequest>,
    responses: Outbox,
}

impl Conn {
    fn next_request(&mut self) -> DiscoveryRequest {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.requests.try_recv() {
                Ok(r) => return r,
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no request from the proxy: {e}"),
            }
        }
    }

    /// The four initial subscriptions; returns them (the first carries the node).
    fn subscriptions(&mut self) -> Vec<DiscoveryRequest> {
        let subs: Vec<_> = (0..4).map(|_| self.next_request()).collect();
        let kinds_seen: Vec<&str> = subs.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(kinds_seen, kinds::ALL);
        subs
    }

    fn send(&self, resp: DiscoveryResponse) {
        self.responses.blocking_send(Ok(resp)).unwrap();
    }

    /// Sends `resp` and returns the proxy's answer to it.
    fn exchange(&mut self, resp: DiscoveryResponse) -> DiscoveryRequest {
        let nonce = resp.nonce.clone();
        self.send(resp);
        let reply = self.next_request();
        assert_eq!(reply.response_nonce, nonce);
        reply
    }
}

/// What the fake knows for on-demand subscriptions, shared with the test.
#[derive(Clone)]
struct OnDemandAnswers {
    /// Endpoints by name; a subscribed name not here is answered as removed (as muon-control
    /// does, so that a sidecar never waits for a name that does not exist).
    endpoints: Arc<Mutex<BTreeMap<String, Resource>>>,
    /// The names of every subscription the fake answered, one entry per request.
    subscriptions: Arc<Mutex<Vec<Vec<String>>>>,
    /// Answers are held while this is false.
    open: tokio::sync::watch::Sender<bool>,
}

impl OnDemandAnswers {
    fn new() -> Self {
        OnDemandAnswers {
            endpoints: Arc::default(),
            subscriptions: Arc::default(),
            open: tokio::sync::watch::Sender::new(true),
        }
    }

    fn subscriptions(&self) -> Vec<Vec<String>> {
        self.subscriptions.lock().unwrap().clone()
    }

    /// Answers a named subscription like muon-control: the subscribed resources that exist,
    /// the other names as removed.
    fn answer(&self, names: &[String], nonce: String) -> DiscoveryResponse {
        let known = self.endpoints.lock().unwrap();
        let (found, missing): (Vec<&String>, Vec<&String>) =
            names.iter().partition(|n| known.contains_key(*n));
        DiscoveryResponse {
            type_url: kinds::ENDPOINTS.into(),
            version_info: nonce.clone(),
            nonce,
            resources: found.into_iter().map(|n| known[n].clone()).collect(),
            removed_resources: missing.into_iter().cloned().collect(),
            continues: false,
        }
    }
}

struct Fake {
    conns: std::sync::mpsc::Sender<Conn>,
    on_demand: OnDemandAnswers,
}

#[tonic::async_trait]
impl Discovery for Fake {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut incoming = req.into_inner();
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel(16);
        // Weak: dropping the test's `Conn` still ends the stream.
        let responses = tx.downgrade();
        let on_demand = self.on_demand.clone();
        tokio::spawn(async move {
            // The initial request of each kind goes to the test, which scripts the answer.
            // Later subscriptions (on demand) are answered here, and their ACKs swallowed.
            let mut kinds_seen = std::collections::HashSet::new();
            let mut answered = 0;
            while let Ok(Some(r)) = incoming.message().await {
                let first = kinds_seen.insert(r.type_url.clone());
                if !first && r.response_nonce.is_empty() && !r.resource_names_subscribe.is_empty() {
                    on_demand
                        .subscriptions
                        .lock()
                        .unwrap()
                        .push(r.resource_names_subscribe.clone());
                    let mut open = on_demand.open.subscribe();
                    let _ = open.wait_for(|o| *o).await;
                    answered += 1;
                    let resp =
                        on_demand.answer(&r.resource_names_subscribe, format!("od-{answered}"));
                    let Some(responses) = responses.upgrade() else {
                        break;
                    };
                    if responses.send(Ok(resp)).await.is_err() {
                        break;
                    }
                    continue;
                }
                if r.response_nonce.starts_with("od-") {
                    assert!(r.error_detail.is_none(), "on-demand answer NACKed: {r:?}");
                    continue;
                }
                if req_tx.send(r).is_err() {
                    break;
                }
            }
        });
        let _ = self.conns.send(Conn {
            requests: req_rx,
            responses: tx,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A fake control plane in a runtime of its own: dropping it kills every connection, like a
/// control plane that crashed.
struct ControlPlane {
    addr: SocketAddr,
    conns: std::sync::mpsc::Receiver<Conn>,
    on_demand: OnDemandAnswers,
    rt: Option<tokio::runtime::Runtime>,
}

impl ControlPlane {
    fn start(addr: SocketAddr) -> ControlPlane {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, conns) = std::sync::mpsc::channel();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let on_demand = OnDemandAnswers::new();
        let fake = Fake {
            conns: tx,
            on_demand: on_demand.clone(),
        };
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        ControlPlane {
            addr,
            conns,
            on_demand,
            rt: Some(rt),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accept(&self) -> Conn {
        self.conns
            .recv_timeout(Duration::from_secs(20))
            .expect("the proxy opened a discovery stream")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Resources.

fn service(name: &str, vip: &str, port: u32, target_port: u32) -> Resource {
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
                target_port,
                protocol: "tcp".into(),
                name: "http".into(),
            }],
        })),
    }
}

fn endpoints(name: &str, addrs: &[&str]) -> Resource {
    Resource {
        name: format!("{name}.shop"),
        version: "1".into(),
        kind: Some(Kind::Endpoints(v1::Endpoints {
            service: name.into(),
            namespace: "shop".into(),
            endpoints: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| v1::Endpoint {
                    address: (*a).into(),
                    workload: format!("{name}-{i}"),
                    weight: 1,
                    ready: true,
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

fn response(type_url: &str, version: &str, resources: Vec<Resource>) -> DiscoveryResponse {
    DiscoveryResponse {
        type_url: type_url.into(),
        version_info: version.into(),
        nonce: format!("{type_url}-{version}"),
        resources,
        removed_resources: vec![],
        continues: false,
    }
}

/// The first full state: web.shop at 198.19.0.1:80 → `backend`'s port on 127.0.0.1.
fn initial_sync(conn: &mut Conn, backend_port: u16) {
    let first: [(&str, Vec<Resource>); 4] = [
        (
            kinds::SERVICES,
            vec![service("web", "198.19.0.1", 80, u32::from(backend_port))],
        ),
        (kinds::ENDPOINTS, vec![endpoints("web", &["127.0.0.1"])]),
        (kinds::ROUTES, vec![]),
        (kinds::POLICIES, vec![]),
    ];
    for (kind, resources) in first {
        let ack = conn.exchange(response(kind, "1", resources));
        assert_eq!(ack.type_url, kind);
        assert_eq!(ack.version_info, "1", "ACK carries the version");
        assert!(ack.error_detail.is_none(), "{ack:?}");
    }
}

// ---------------------------------------------------------------------------------------
// In-process: the client feeding the real outbound path.

fn config(extra: &[&str]) -> Config {
    let argv = [
        "muon-proxy",
        "--pod-name",
        "client-0",
        "--pod-namespace",
        "shop",
        "--service-account",
        "client",
        "--zone",
        "a",
        "--pod-ip",
        "198.18.0.3",
    ]
    .into_iter()
    .chain(extra.iter().copied());
    Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
}

/// Starts the discovery client in a runtime of its own; returns what the data path reads.
fn start_client(config: Config) -> (Arc<Shared>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let table: SharedTable = Arc::new(ArcSwapOption::empty());
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared::new(&config, table.clone(), metrics.clone()));
    let publisher = Publisher::new(table, metrics).with_on_demand(shared.on_demand.clone());
    rt.spawn(async move {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        let (_, run) = discovery::start(&config, hup, publisher, None).unwrap();
        run.await;
    });
    (shared, rt)
}

/// Two backends on the same port: 127.0.0.1 answers "one", 127.0.0.2 answers "two".
fn backends() -> u16 {
    backends_at("127.0.0.1", "127.0.0.2")
}

/// Two backends on the same port: `one` answers "one", `two` answers "two". The port is
/// free on `one`'s address but may be taken on `two`'s (a busy host has many sockets, some in
/// TIME-WAIT): then another port is tried.
fn backends_at(one: &str, two: &str) -> u16 {
    let (one, two) = (0..100)
        .find_map(|_| {
            let one = std::net::TcpListener::bind((one, 0)).unwrap();
            let port = one.local_addr().unwrap().port();
            match std::net::TcpListener::bind((two, port)) {
                Ok(two) => Some((one, two)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => None,
                Err(e) => panic!("binding {two}:{port}: {e}"),
            }
        })
        .expect("a port free on both addresses");
    let port = one.local_addr().unwrap().port();
    for (l, name) in [(one, "one"), (two, "two")] {
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let _ = s.write_all(name.as_bytes());
            }
        });
    }
    port
}

/// Connects through `outbound::handle` as if the app had dialled `dst`; returns who answered.
fn call(rt: &tokio::runtime::Runtime, shared: &Arc<Shared>, dst: &str) -> (Outcome, String) {
    rt.block_on(call_async(shared.clone(), dst))
}

async fn call_async(shared: Arc<Shared>, dst: &str) -> (Outcome, String) {
    let dst: SocketAddr = dst.parse().unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (server, src) = l.accept().await.unwrap();
    let task = tokio::spawn(async move {
        let mut rec = Record::new(Direction::Outbound, src, dst);
        outbound::handle(&shared, server, &mut rec).await
    });
    use tokio::io::AsyncReadExt;
    let mut got = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), app.read_to_string(&mut got)).await;
    drop(app);
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    (outcome, got)
}

/// An app's connection as the outbound listener would accept it: (the app's end, the
/// accepted end, the app's address).
async fn app_connection() -> (tokio::net::TcpStream, tokio::net::TcpStream, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (server, src) = l.accept().await.unwrap();
    (app, server, src)
}

/// What the app reads until the proxy closes its side; then the app closes too.
async fn read_app(mut app: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), app.read_to_string(&mut got)).await;
    got
}

/// Polls `fut` once: its output if it finished, None if it is now waiting for something.
async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = std::future::ready(()) => None,
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sync_update_nack_and_reconnect_drive_the_outbound_table() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]));

    // Hello: the node, then one subscription per kind, everything ("*").
    let mut conn = cp.accept();
    let subs = conn.subscriptions();
    let node = subs[0].node.clone().expect("node on the first request");
    assert_eq!(node.id, "client-0.shop");
    assert_eq!(node.service_account, "client");
    assert_eq!(node.locality.unwrap().zone, "a");
    assert_eq!(node.ips, ["198.18.0.3"]);
    assert!(subs[1..].iter().all(|r| r.node.is_none()));
    assert!(subs.iter().all(|r| r.resource_names_subscribe == ["*"]));

    // Not ready until every kind arrived once.
    conn.exchange(response(
        kinds::SERVICES,
        "1",
        vec![service("web", "198.19.0.1", 80, u32::from(port))],
    ));
    assert!(
        shared.table.load().is_none(),
        "published before the full sync"
    );
    for kind in [kinds::ENDPOINTS, kinds::ROUTES, kinds::POLICIES] {
        let res = match kind {
            kinds::ENDPOINTS => vec![endpoints("web", &["127.0.0.1"])],
            _ => vec![],
        };
        conn.exchange(response(kind, "1", res));
    }
    assert!(shared.table.load().is_some(), "first full sync published");
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "one".into())
    );
    // Saved by a background writer: within moments, not before `exchange` returns.
    let saved_by = std::time::Instant::now() + Duration::from_secs(5);
    while !state.path().join("tables.pb").exists() {
        assert!(std::time::Instant::now() < saved_by, "saved after the sync");
        std::thread::sleep(Duration::from_millis(10));
    }

    // An endpoint change swaps the table: the next connection goes to the new endpoint.
    let ack = conn.exchange(response(
        kinds::ENDPOINTS,
        "2",
        vec![endpoints("web", &["127.0.0.2"])],
    ));
    assert_eq!(ack.version_info, "2");
    assert!(ack.error_detail.is_none());
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "two".into())
    );

    // A bad resource is NACKed by name with the reason; the rest of the response applies
    // and the rejected one keeps serving its last good version.
    let nack = conn.exchange(response(
        kinds::SERVICES,
        "2",
        vec![
            service("web", "not-an-ip", 80, u32::from(port)),
            service("api", "198.19.0.9", 80, u32::from(port)),
        ],
    ));
    let detail = nack.error_detail.expect("NACK");
    assert_eq!(detail.resources, ["web.shop"]);
    assert!(detail.message.contains("not-an-ip"), "{}", detail.message);
    assert_eq!(
        nack.version_info, "1",
        "NACK carries the last accepted version"
    );
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "two".into())
    );
    let routes = shared.table.load_full().unwrap();
    assert!(routes.lookup("198.19.0.9:80".parse().unwrap()).is_some());
    let text = shared.metrics.encode();
    for want in [
        r#"muon_discovery_updates_total{type_url="services",result="nack"} 1"#,
        r#"muon_discovery_updates_total{type_url="endpoints",result="ack"} 2"#,
        "muon_discovery_connected 1",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }

    // Incremental removal.
    let mut rm = response(kinds::SERVICES, "3", vec![]);
    rm.removed_resources = vec!["api.shop".into()];
    assert!(conn.exchange(rm).error_detail.is_none());
    let routes = shared.table.load_full().unwrap();
    assert!(routes.lookup("198.19.0.9:80".parse().unwrap()).is_none());

    // The control plane dies: the last good table keeps serving...
    let addr = cp.addr;
    drop(conn);
    drop(cp);
    wait_for("disconnected", Duration::from_secs(10), || {
        shared
            .metrics
            .encode()
            .contains("muon_discovery_connected 0")
    });
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "two".into())
    );

    // ...and when it is back the client re-subscribes and takes the full state again,
    // in which web's endpoint moved back and web's VIP moved.
    let cp = ControlPlane::start(addr);
    let mut conn = cp.accept();
    let subs = conn.subscriptions();
    assert_eq!(subs[0].node.as_ref().unwrap().id, "client-0.shop");
    let full: [(&str, Vec<Resource>); 4] = [
        (
            kinds::SERVICES,
            vec![service("web", "198.19.0.5", 80, u32::from(port))],
        ),
        (kinds::ENDPOINTS, vec![endpoints("web", &["127.0.0.1"])]),
        (kinds::ROUTES, vec![]),
        (kinds::POLICIES, vec![]),
    ];
    for (kind, res) in full {
        assert!(conn
            .exchange(response(kind, "10", res))
            .error_detail
            .is_none());
    }
    assert_eq!(
        call(&rt, &shared, "198.19.0.5:80"),
        (Outcome::Ok, "one".into())
    );
    let routes = shared.table.load_full().unwrap();
    assert!(
        routes.lookup("198.19.0.1:80".parse().unwrap()).is_none(),
        "a full state replaces what the previous stream had"
    );
    let text = shared.metrics.encode();
    assert!(text.contains("muon_discovery_reconnects_total"), "{text}");
    assert!(
        !text.contains("muon_discovery_reconnects_total 0"),
        "{text}"
    );
    rt.shutdown_background();
}

fn route(name: &str, path_regex: &str) -> Resource {
    Resource {
        name: format!("{name}.shop"),
        version: "1".into(),
        kind: Some(Kind::Route(v1::Route {
            name: name.into(),
            namespace: "shop".into(),
            kind: "HTTPRoute".into(),
            parent_refs: vec![v1::ParentRef {
                kind: "Service".into(),
                name: "web.shop".into(),
                ..Default::default()
            }],
            rules: vec![v1::RouteRule {
                matches: vec![v1::RouteMatch {
                    path_type: "RegularExpression".into(),
                    path_value: path_regex.into(),
                    ..Default::default()
                }],
                backends: vec![v1::BackendRef {
                    service: "web.shop".into(),
                    port: 80,
                    weight: 1,
                }],
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

/// Whether the table routes `path` on web's port 80 to a rule of route `items`.
fn routes_items(shared: &Shared, path: &str) -> bool {
    let table = shared.table.load_full().expect("a table");
    let target = table.lookup("198.19.0.1:80".parse().unwrap()).expect("web");
    let Some(router) = &target.router else {
        return false;
    };
    let headers = http::HeaderMap::new();
    let req = muon_proxy::route::Request {
        method: &http::Method::GET,
        path,
        query: None,
        headers: &headers,
        host: None,
    };
    router
        .find(&req)
        .is_some_and(|f| &*f.route.name == "items.shop")
}

#[test]
fn a_route_the_sidecar_cannot_use_is_nacked_with_its_reason_and_the_last_good_one_keeps_routing() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, _rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]));
    let mut conn = cp.accept();
    conn.subscriptions();
    conn.exchange(response(
        kinds::SERVICES,
        "1",
        vec![service("web", "198.19.0.1", 80, u32::from(port))],
    ));
    conn.exchange(response(
        kinds::ENDPOINTS,
        "1",
        vec![endpoints("web", &["127.0.0.1"])],
    ));
    let ack = conn.exchange(response(
        kinds::ROUTES,
        "1",
        vec![route("items", "/items/[0-9]+")],
    ));
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    conn.exchange(response(kinds::POLICIES, "1", vec![]));
    assert!(routes_items(&shared, "/items/42"));
    assert!(!routes_items(&shared, "/other"));

    // A regex this sidecar cannot compile (a control plane of another version may send one).
    let nack = conn.exchange(response(
        kinds::ROUTES,
        "2",
        vec![route("items", "/items/([0-9]+")],
    ));
    let detail = nack.error_detail.expect("NACK");
    assert_eq!(detail.resources, ["items.shop"]);
    assert!(
        detail.message.contains("items.shop")
            && detail.message.contains("invalid regular expression"),
        "{}",
        detail.message
    );
    assert_eq!(nack.version_info, "1", "the last version accepted whole");
    assert!(
        routes_items(&shared, "/items/42"),
        "the last good route keeps routing"
    );
}

#[test]
fn registry_only_refuses_destinations_no_service_claims() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--outbound-policy",
        "registry-only",
    ]));
    let mut conn = cp.accept();
    conn.subscriptions();
    initial_sync(&mut conn, port);
    // Known: proxied. Unknown (the backend's own address): refused, not passed through.
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "one".into())
    );
    let unknown = format!("127.0.0.2:{port}");
    assert_eq!(
        call(&rt, &shared, &unknown),
        (Outcome::RefusedUnknown, String::new())
    );
    rt.shutdown_background();
}

// ---------------------------------------------------------------------------------------
// On demand: endpoints subscribed per service, on the first connection to it.

const WEB: &str = "198.19.0.1:80";
const GONE: &str = "198.19.0.2:80";

/// The first full state in on-demand mode: every service (web, and gone, whose endpoints the
/// control plane does not have), no endpoints yet. Ready only once the (empty) named
/// endpoints subscription was answered too. The fake answers `web.shop` with 127.0.0.1.
fn on_demand_sync(cp: &ControlPlane, conn: &mut Conn, shared: &Shared, port: u16) {
    cp.on_demand
        .endpoints
        .lock()
        .unwrap()
        .insert("web.shop".into(), endpoints("web", &["127.0.0.1"]));
    let subs = conn.subscriptions();
    for sub in &subs {
        let want: &[&str] = if sub.type_url == kinds::ENDPOINTS {
            &[]
        } else {
            &["*"]
        };
        assert_eq!(sub.resource_names_subscribe, want, "{sub:?}");
    }
    let port = u32::from(port);
    let first: [(&str, Vec<Resource>); 3] = [
        (
            kinds::SERVICES,
            vec![
                service("web", "198.19.0.1", 80, port),
                service("gone", "198.19.0.2", 80, port),
            ],
        ),
        (kinds::ROUTES, vec![]),
        (kinds::POLICIES, vec![]),
    ];
    for (kind, resources) in first {
        assert!(conn
            .exchange(response(kind, "1", resources))
            .error_detail
            .is_none());
    }
    assert!(
        shared.table.load().is_none(),
        "published before the endpoints subscription was answered"
    );
    assert!(conn
        .exchange(response(kinds::ENDPOINTS, "1", vec![]))
        .error_detail
        .is_none());
    assert!(shared.table.load().is_some(), "first full sync published");
}

fn on_demand_subscriptions(shared: &Shared) -> String {
    let text = shared.metrics.encode();
    text.lines()
        .find(|l| l.starts_with("muon_discovery_on_demand_subscriptions_total "))
        .unwrap_or_else(|| panic!("no on-demand metric in\n{text}"))
        .to_owned()
}

#[test]
fn on_demand_subscribes_once_per_service_and_resubscribes_after_a_reconnect() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--discovery-mode",
        "on-demand",
        // Far beyond how long any call below may take (`call` gives up after 10 s): a
        // connection that ends in time was released by an answer, not by this deadline.
        "--connect-timeout",
        "60s",
    ]));
    let mut conn = cp.accept();
    on_demand_sync(&cp, &mut conn, &shared, port);
    let routes = shared.table.load_full().unwrap();
    assert!(!routes.lookup(WEB.parse().unwrap()).unwrap().backends.known);

    // The first connection to web subscribes to its endpoints, waits for them, and goes
    // there; the second finds them in the table and subscribes to nothing.
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "one".into()));
    assert_eq!(cp.on_demand.subscriptions(), [["web.shop"]]);
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "one".into()));
    assert_eq!(cp.on_demand.subscriptions().len(), 1);
    assert_eq!(
        on_demand_subscriptions(&shared),
        "muon_discovery_on_demand_subscriptions_total 1"
    );
    let routes = shared.table.load_full().unwrap();
    assert!(routes.lookup(WEB.parse().unwrap()).unwrap().backends.known);

    // gone's endpoints do not exist: the control plane answers the name as removed, and the
    // connection ends at once as no_endpoints instead of waiting out the 60 s deadline. Once
    // answered, later connections do not ask again.
    let started = Instant::now();
    assert_eq!(
        call(&rt, &shared, GONE),
        (Outcome::NoEndpoints, String::new())
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?}: for the deadline, not the answer",
        started.elapsed()
    );
    assert!(
        shared.on_demand.as_ref().unwrap().pending().is_empty(),
        "the removal answered the subscription"
    );
    assert_eq!(
        call(&rt, &shared, GONE),
        (Outcome::NoEndpoints, String::new())
    );
    assert_eq!(cp.on_demand.subscriptions(), [["web.shop"], ["gone.shop"]]);

    // A subscribed service follows changes like any other.
    let ack = conn.exchange(response(
        kinds::ENDPOINTS,
        "2",
        vec![endpoints("web", &["127.0.0.2"])],
    ));
    assert!(ack.error_detail.is_none());
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "two".into()));

    // What was subscribed is saved with the tables.
    let cache = discovery::cache::Cache::new(state.path().to_owned());
    wait_for("saved subscriptions", Duration::from_secs(5), || {
        cache.load().ok().flatten().map(|s| s.on_demand)
            == Some(vec!["gone.shop".into(), "web.shop".into()])
    });

    // The control plane goes away: the subscribed service keeps its last endpoints.
    let addr = cp.addr;
    drop(conn);
    drop(cp);
    wait_for("disconnected", Duration::from_secs(10), || {
        shared
            .metrics
            .encode()
            .contains("muon_discovery_connected 0")
    });
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "two".into()));

    // Back: the new stream's initial endpoints request lists every name subscribed, and
    // nothing needs subscribing again.
    let cp = ControlPlane::start(addr);
    let mut conn = cp.accept();
    let subs = conn.subscriptions();
    assert_eq!(subs[1].resource_names_subscribe, ["gone.shop", "web.shop"]);
    for sub in [&subs[0], &subs[2], &subs[3]] {
        assert_eq!(sub.resource_names_subscribe, ["*"]);
    }
    let full: [(&str, Vec<Resource>); 4] = [
        (
            kinds::SERVICES,
            vec![service("web", "198.19.0.1", 80, u32::from(port))],
        ),
        (kinds::ENDPOINTS, vec![endpoints("web", &["127.0.0.1"])]),
        (kinds::ROUTES, vec![]),
        (kinds::POLICIES, vec![]),
    ];
    for (kind, res) in full {
        assert!(conn
            .exchange(response(kind, "10", res))
            .error_detail
            .is_none());
    }
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "one".into()));
    assert!(cp.on_demand.subscriptions().is_empty());
    assert_eq!(
        on_demand_subscriptions(&shared),
        "muon_discovery_on_demand_subscriptions_total 2"
    );
    rt.shutdown_background();
}

#[test]
fn on_demand_concurrent_first_connections_share_one_subscription() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--discovery-mode",
        "on-demand",
        // Both connections wait for the held answer: far longer than the test takes.
        "--connect-timeout",
        "60s",
    ]));
    let mut conn = cp.accept();
    on_demand_sync(&cp, &mut conn, &shared, port);

    // The control plane holds its answer until both connections are waiting. Each
    // connection's handler is polled once by hand: when that poll returns pending, the
    // connection has missed, subscribed (or joined the subscription) and is waiting.
    cp.on_demand.open.send_replace(false);
    let answers = cp.on_demand.clone();
    let on_demand = shared.on_demand.clone().unwrap();
    let (a, b) = rt.block_on(async {
        let dst: SocketAddr = WEB.parse().unwrap();
        let (app_a, server_a, src_a) = app_connection().await;
        let (app_b, server_b, src_b) = app_connection().await;
        let mut rec_a = Record::new(Direction::Outbound, src_a, dst);
        let mut rec_b = Record::new(Direction::Outbound, src_b, dst);
        let mut first = std::pin::pin!(outbound::handle(&shared, server_a, &mut rec_a));
        let mut second = std::pin::pin!(outbound::handle(&shared, server_b, &mut rec_b));
        assert!(
            poll_once(&mut first).await.is_none(),
            "the first connection waits for the answer"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while answers.subscriptions().is_empty() {
            assert!(Instant::now() < deadline, "no subscription");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            poll_once(&mut second).await.is_none(),
            "the second connection waits for the same answer"
        );
        assert_eq!(on_demand.pending(), ["web.shop"]);
        answers.open.send_replace(true);
        let (outcome_a, got_a, outcome_b, got_b) =
            tokio::time::timeout(Duration::from_secs(20), async {
                tokio::join!(first, read_app(app_a), second, read_app(app_b))
            })
            .await
            .expect("both connections released by the answer");
        ((outcome_a, got_a), (outcome_b, got_b))
    });
    assert_eq!(a, (Outcome::Ok, "one".into()));
    assert_eq!(b, (Outcome::Ok, "one".into()));
    assert_eq!(cp.on_demand.subscriptions(), [["web.shop"]]);
    assert_eq!(
        on_demand_subscriptions(&shared),
        "muon_discovery_on_demand_subscriptions_total 1"
    );
    rt.shutdown_background();
}

// ---------------------------------------------------------------------------------------
// On demand against the real control plane (`target/debug/muon-control`).

/// A `muon-control` process serving `--config-dir`; killed on drop.
struct RealControlPlane(Child);

impl RealControlPlane {
    fn start(grpc: SocketAddr, config_dir: &std::path::Path, data_dir: &std::path::Path) -> Self {
        // `cargo xtask test` builds every binary first and says where (MUON_BIN_DIR); a bare
        // `cargo test` finds it next to this test's own directory if it was built.
        let dir = std::env::var_os("MUON_BIN_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().unwrap();
                exe.parent()
                    .and_then(|deps| deps.parent())
                    .unwrap()
                    .to_path_buf()
            });
        let bin = dir.join("muon-control");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask test`, or `cargo build -p muon-control` first",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config-dir")
            .arg(config_dir)
            .args([
                "--debounce",
                "10ms",
                "--log-level",
                "warn",
                "--insecure-plaintext",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn muon-control");
        RealControlPlane(child)
    }
}

impl Drop for RealControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// web (one workload at `web_ip`) and gone (no workload), both on `port`.
const WORKLOAD_ONE: &str = "198.18.0.1";
const WORKLOAD_TWO: &str = "198.18.0.2";

/// Moves this test's thread, and every thread and process it starts from now on, into a
/// network namespace of its own (gone with them), with `lo` up and `addrs` on it: addresses
/// a Workload may have, reachable only here. The host's namespace is not touched. Needs
/// root, as the end-to-end tests do (CI is root).
fn private_network(addrs: &[&str]) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare(CLONE_NEWNET): this test needs root");
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["link", "set", "lo", "up"]);
    for a in addrs {
        ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
}

fn write_mesh(dir: &std::path::Path, port: u16, web_ip: &str) {
    let yaml = format!(
        "apiVersion: muon.io/v1alpha1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  vips: [198.19.0.1]
  ports: [{{port: 80, targetPort: {port}}}]
  selector: {{app: web}}
---
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {{name: gone, namespace: shop}}
spec:
  vips: [198.19.0.2]
  ports: [{{port: 80, targetPort: {port}}}]
  selector: {{app: gone}}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {{name: web-0, namespace: shop, labels: {{app: web}}}}
spec: {{address: {web_ip}}}
"
    );
    std::fs::write(dir.join("mesh.yaml"), yaml).unwrap();
}

fn metric(shared: &Shared, prefix: &str) -> u64 {
    let text = shared.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
}

#[test]
fn on_demand_against_muon_control_subscribes_once_and_resubscribes_after_its_restart() {
    // muon-control refuses loopback Workload addresses: the workloads live at lab
    // addresses, in a network namespace of this test's own.
    private_network(&[WORKLOAD_ONE, WORKLOAD_TWO]);
    let port = backends_at(WORKLOAD_ONE, WORKLOAD_TWO);
    let dirs = tempfile::tempdir().unwrap();
    let (config_dir, data_dir, state_dir) = (
        dirs.path().join("config"),
        dirs.path().join("data"),
        dirs.path().join("state"),
    );
    std::fs::create_dir_all(&config_dir).unwrap();
    write_mesh(&config_dir, port, WORKLOAD_ONE);
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cp = RealControlPlane::start(grpc, &config_dir, &data_dir);
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &format!("http://{grpc}"),
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--discovery-mode",
        "on-demand",
        // Far beyond how long any call below may take (`call` gives up after 10 s): a
        // connection that ends in time was released by an answer, not by this deadline.
        "--connect-timeout",
        "60s",
    ]));
    wait_for("web in the table", Duration::from_secs(20), || {
        shared
            .table
            .load()
            .as_ref()
            .is_some_and(|r| r.lookup(WEB.parse().unwrap()).is_some())
    });
    let routes = shared.table.load_full().unwrap();
    let web = routes.lookup(WEB.parse().unwrap()).unwrap();
    assert!(!web.backends.known);
    assert!(web.backends.endpoints.is_empty());

    let subscriptions = "muon_discovery_on_demand_subscriptions_total ";
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "one".into()));
    assert_eq!(call(&rt, &shared, WEB), (Outcome::Ok, "one".into()));
    assert_eq!(metric(&shared, subscriptions), 1);
    // Answered as removed: released at once, not at the 60 s deadline.
    let started = Instant::now();
    assert_eq!(
        call(&rt, &shared, GONE),
        (Outcome::NoEndpoints, String::new())
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?}: for the deadline, not the answer",
        started.elapsed()
    );
    assert!(
        shared.on_demand.as_ref().unwrap().pending().is_empty(),
        "the removal answered the subscription"
    );
    assert_eq!(metric(&shared, subscriptions), 2);

    // The control plane restarts with web's workload moved: the client's new stream
    // subscribes to web again (a full state without it would leave web no endpoints).
    let acks = r#"muon_discovery_updates_total{type_url="endpoints",result="ack"} "#;
    let before = metric(&shared, acks);
    drop(cp);
    write_mesh(&config_dir, port, WORKLOAD_TWO);
    let _cp = RealControlPlane::start(grpc, &config_dir, &data_dir);
    wait_for(
        "the endpoints of the new stream",
        Duration::from_secs(20),
        || {
            metric(&shared, acks) > before
                && shared
                    .metrics
                    .encode()
                    .contains("muon_discovery_connected 1")
        },
    );
    wait_for("web moved", Duration::from_secs(10), || {
        call(&rt, &shared, WEB) == (Outcome::Ok, "two".into())
    });
    assert_eq!(
        metric(&shared, subscriptions),
        2,
        "re-subscribed, not counted again"
    );
    rt.shutdown_background();
}

// ---------------------------------------------------------------------------------------
// The real binary.

const BIN: &str = env!("CARGO_BIN_EXE_muon-proxy");

struct Proxy {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    health: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(args: &[&str]) -> Proxy {
        let port = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let [out, inb, health, admin] = [(); 4].map(port);
        let mut child = Command::new(BIN)
            .args(["--outbound-addr", &out.to_string()])
            .args(["--inbound-addr", &inb.to_string()])
            .args(["--health-addr", &health.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--pod-name", "client-0", "--pod-namespace", "shop"])
            .args(["--log-format", "json"])
            .args(args)
            .env_remove("MUON_LOG")
            .env_remove("MUON_CONTROL_PLANE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn muon-proxy");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proxy {
            child,
            lines,
            health,
            admin,
        }
    }

    fn ready(&self) -> u16 {
        http_get(self.health, "/ready").map_or(0, |(s, _)| s)
    }

    fn dump(&self) -> Value {
        let (status, body) = http_get(self.admin, "/config_dump").unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    fn metrics(&self) -> String {
        http_get(self.health, "/metrics").unwrap().1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    Some((status, resp.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn binary_is_ready_after_the_first_sync_and_restarts_from_saved_tables_during_an_outage() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let url = cp.url();
    let args = ["--control-plane", &url, "--state-dir", &state_dir];
    let mut proxy = Proxy::start(&args);

    let mut conn = cp.accept();
    conn.subscriptions();
    assert_eq!(proxy.ready(), 503, "not ready before the first sync");
    conn.exchange(response(
        kinds::SERVICES,
        "1",
        vec![service("web", "198.19.0.1", 80, 8080)],
    ));
    conn.exchange(response(
        kinds::ENDPOINTS,
        "1",
        vec![endpoints("web", &["198.18.0.2"])],
    ));
    conn.exchange(response(kinds::ROUTES, "1", vec![]));
    assert_eq!(proxy.ready(), 503, "not ready with one kind missing");
    conn.exchange(response(kinds::POLICIES, "1", vec![]));
    wait_for("/ready", Duration::from_secs(5), || proxy.ready() == 200);

    let dump = proxy.dump();
    assert_eq!(dump["source"], "control-plane");
    assert_eq!(dump["resources"]["services"]["version"], "1");
    assert_eq!(
        dump["resources"]["services"]["resources"][0]["resource"]["vips"][0],
        "198.19.0.1"
    );
    assert_eq!(
        dump["resources"]["endpoints"]["resources"][0]["resource"]["endpoints"][0]["address"],
        "198.18.0.2"
    );
    assert_eq!(dump["table"]["services"][0]["endpoints"][0]["pod"], "web-0");
    assert_eq!(dump["flags"]["control_plane"], url.as_str());
    let metrics = proxy.metrics();
    assert!(metrics.contains("muon_discovery_connected 1"), "{metrics}");
    assert!(
        metrics.contains(r#"muon_discovery_updates_total{type_url="policies",result="ack"} 1"#),
        "{metrics}"
    );

    // Outage: the control plane is gone, and the sidecar restarts. It serves the saved
    // tables and is ready, without the control plane. The tables are saved on a thread of
    // their own (write, fsync, rename) after the sync; the kill below must not race it.
    let saved = state.path().join("tables.pb");
    wait_for("the tables saved", Duration::from_secs(10), || {
        saved.exists()
    });
    let addr = cp.addr;
    drop(conn);
    drop(cp);
    drop(proxy);
    proxy = Proxy::start(&args);
    let started = Instant::now();
    wait_for("/ready from saved tables", Duration::from_secs(10), || {
        proxy.ready() == 200
    });
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "waited for the control plane first"
    );
    let dump = proxy.dump();
    assert_eq!(dump["source"], "saved");
    assert_eq!(dump["table"]["services"][0]["vips"][0], "198.19.0.1");
    assert_eq!(dump["resources"]["services"]["version"], "1");
    assert!(proxy.metrics().contains("muon_discovery_connected 0"));

    // The control plane comes back: the sidecar connects on its own and syncs.
    let cp = ControlPlane::start(addr);
    let mut conn = cp.accept();
    conn.subscriptions();
    for kind in kinds::ALL {
        let res = match kind {
            kinds::SERVICES => vec![service("web", "198.19.0.7", 80, 8080)],
            _ => vec![],
        };
        conn.exchange(response(kind, "2", res));
    }
    wait_for("resynced", Duration::from_secs(5), || {
        proxy.dump()["source"] == "control-plane"
    });
    assert_eq!(
        proxy.dump()["table"]["services"][0]["vips"][0],
        "198.19.0.7"
    );
    assert_eq!(proxy.ready(), 200);
    let logs = proxy.lines.lock().unwrap().join("\n");
    assert!(logs.contains("serving the saved tables"), "{logs}");
}

#[test]
fn binary_on_demand_restores_its_subscriptions_and_shows_them_in_config_dump() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    // Subscribed before a restart.
    discovery::cache::Cache::new(state.path().to_owned())
        .save(&discovery::cache::Saved {
            kinds: vec![],
            on_demand: vec!["web.shop".into()],
        })
        .unwrap();
    let url = cp.url();
    let args = [
        "--control-plane",
        &url,
        "--state-dir",
        &state_dir,
        "--discovery-mode",
        "on-demand",
    ];
    let mut proxy = Proxy::start(&args);

    let mut conn = cp.accept();
    let subs = conn.subscriptions();
    assert_eq!(subs[1].resource_names_subscribe, ["web.shop"]);
    conn.exchange(response(
        kinds::SERVICES,
        "1",
        vec![
            service("web", "198.19.0.1", 80, 8080),
            service("db", "198.19.0.2", 5432, 5432),
        ],
    ));
    conn.exchange(response(kinds::ROUTES, "1", vec![]));
    conn.exchange(response(kinds::POLICIES, "1", vec![]));
    conn.exchange(response(
        kinds::ENDPOINTS,
        "1",
        vec![endpoints("web", &["198.18.0.2"])],
    ));
    wait_for("/ready", Duration::from_secs(5), || proxy.ready() == 200);

    let dump = proxy.dump();
    assert_eq!(dump["flags"]["discovery_mode"], "on-demand");
    assert_eq!(dump["discovery"]["mode"], "on-demand");
    assert_eq!(
        dump["discovery"]["subscribed"],
        serde_json::json!(["web.shop"])
    );
    assert_eq!(dump["discovery"]["pending"], serde_json::json!([]));
    assert_eq!(dump["table"]["services"][1]["name"], "web");
    assert_eq!(dump["table"]["services"][1]["endpoints"][0]["pod"], "web-0");
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("muon_discovery_on_demand_subscriptions_total 0"),
        "restored names are not new subscriptions: {metrics}"
    );

    // Restarted during an outage: the saved tables serve, with web's endpoints known.
    drop(conn);
    drop(cp);
    drop(proxy);
    proxy = Proxy::start(&args);
    wait_for("/ready from saved tables", Duration::from_secs(10), || {
        proxy.ready() == 200
    });
    let dump = proxy.dump();
    assert_eq!(dump["source"], "saved");
    assert_eq!(
        dump["discovery"]["subscribed"],
        serde_json::json!(["web.shop"])
    );
    assert_eq!(dump["table"]["services"][1]["endpoints"][0]["pod"], "web-0");
}

#[test]
fn table_file_and_control_plane_together_are_refused() {
    let out = Command::new(BIN)
        .args(["--control-plane", "http://127.0.0.1:15010"])
        .args(["--table-file", "/nonexistent/table.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--control-plane") && stderr.contains("--table-file"),
        "{stderr}"
    );
}

#[test]
fn a_response_in_parts_is_applied_whole_when_its_last_part_arrives() {
    let port = backends();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (shared, rt) = start_client(config(&[
        "--control-plane",
        &cp.url(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]));
    let mut conn = cp.accept();
    conn.subscriptions();
    // The first (full) state of services, in two parts.
    let mut first = response(
        kinds::SERVICES,
        "1",
        vec![service("web", "198.19.0.1", 80, u32::from(port))],
    );
    first.continues = true;
    let ack = conn.exchange(first);
    assert!(ack.error_detail.is_none());
    let second = response(
        kinds::SERVICES,
        "1",
        vec![service("api", "198.19.0.9", 80, u32::from(port))],
    );
    let ack = conn.exchange(second);
    assert_eq!(
        ack.version_info, "1",
        "the last part's ACK carries the version"
    );
    for (kind, resources) in [
        (
            kinds::ENDPOINTS,
            vec![
                endpoints("web", &["127.0.0.1"]),
                endpoints("api", &["127.0.0.2"]),
            ],
        ),
        (kinds::ROUTES, vec![]),
        (kinds::POLICIES, vec![]),
    ] {
        conn.exchange(response(kind, "1", resources));
    }
    // Both parts are in: the first part was not taken for the whole state.
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "one".into())
    );
    assert_eq!(
        call(&rt, &shared, "198.19.0.9:80"),
        (Outcome::Ok, "two".into())
    );
}
