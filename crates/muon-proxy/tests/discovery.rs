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
use muon_proxy::routes::SharedRoutes;
use muon_proxy::{outbound, Direction, Outcome, Shared};
use serde_json::Value;
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

struct Fake {
    conns: std::sync::mpsc::Sender<Conn>,
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
        tokio::spawn(async move {
            while let Ok(Some(r)) = incoming.message().await {
                if req_tx.send(r).is_err() {
                    break;
                }
            }
        });
        let (tx, rx) = mpsc::channel(16);
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
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(Fake { conns: tx }))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        ControlPlane {
            addr,
            conns,
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
            name: name.into(),
            namespace: "shop".into(),
            vips: vec![vip.into()],
            ports: vec![v1::ServicePort {
                port,
                target_port,
                protocol: "http".into(),
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
    let routes: SharedRoutes = Arc::new(ArcSwapOption::empty());
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared::new(&config, routes.clone(), metrics.clone()));
    rt.spawn(async move {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        discovery::run(config, hup, Publisher::new(routes, metrics)).await;
    });
    (shared, rt)
}

/// Two backends on the same port: 127.0.0.1 answers "one", 127.0.0.2 answers "two".
fn backends() -> u16 {
    let one = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = one.local_addr().unwrap().port();
    let two = std::net::TcpListener::bind(("127.0.0.2", port)).unwrap();
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
    let shared = shared.clone();
    let dst: SocketAddr = dst.parse().unwrap();
    rt.block_on(async move {
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
    })
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
        shared.routes.load().is_none(),
        "published before the full sync"
    );
    for kind in [kinds::ENDPOINTS, kinds::ROUTES, kinds::POLICIES] {
        let res = match kind {
            kinds::ENDPOINTS => vec![endpoints("web", &["127.0.0.1"])],
            _ => vec![],
        };
        conn.exchange(response(kind, "1", res));
    }
    assert!(shared.routes.load().is_some(), "first full sync published");
    assert_eq!(
        call(&rt, &shared, "198.19.0.1:80"),
        (Outcome::Ok, "one".into())
    );
    assert!(
        state.path().join("tables.pb").exists(),
        "saved after the sync"
    );

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
    let routes = shared.routes.load_full().unwrap();
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
    let routes = shared.routes.load_full().unwrap();
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
    let routes = shared.routes.load_full().unwrap();
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
    // tables and is ready, without the control plane.
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
