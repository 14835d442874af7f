//! The control plane in-process (and once as a real process), driven over real gRPC on
//! loopback with the generated tonic clients.

use muon_api::json::{json_from_struct, struct_from_json};
use muon_api::v1::kinds::ResourceKind;
use muon_api::v1::{
    self, discovery_client::DiscoveryClient, kinds, management_client::ManagementClient,
    DiscoveryRequest, DiscoveryResponse,
};
use muon_control::{Config, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(5);

async fn start(dir: &Path) -> Server {
    Server::start(&Config::for_tests(dir)).await.unwrap()
}

async fn mgmt(server: &Server) -> ManagementClient<Channel> {
    ManagementClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .unwrap()
}

/// A management API object from its YAML-like JSON form.
fn obj(v: Value) -> v1::Object {
    let meta = &v["metadata"];
    v1::Object {
        api_version: v["apiVersion"].as_str().unwrap_or_default().into(),
        kind: v["kind"].as_str().unwrap_or_default().into(),
        metadata: Some(v1::Metadata {
            name: meta["name"].as_str().unwrap_or_default().into(),
            namespace: meta["namespace"].as_str().unwrap_or_default().into(),
            labels: meta["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().into()))
                        .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        }),
        spec: struct_from_json(&v["spec"]),
    }
}

fn service(name: &str, vip: &str) -> v1::Object {
    obj(json!({
        "apiVersion": "muon.io/v1alpha1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"vips": [vip], "ports": [{"port": 8080, "protocol": "http"}], "selector": {"app": name}}
    }))
}

fn workload(name: &str, app: &str, ip: &str, weight: u32) -> v1::Object {
    obj(json!({
        "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"address": ip, "weight": weight, "serviceAccount": app, "locality": {"zone": "z1"}}
    }))
}

async fn apply(
    c: &mut ManagementClient<Channel>,
    objects: Vec<v1::Object>,
) -> Result<v1::ApplyResponse, tonic::Status> {
    c.apply(v1::ApplyRequest {
        objects,
        dry_run: false,
    })
    .await
    .map(|r| r.into_inner())
}

async fn get(
    c: &mut ManagementClient<Channel>,
    kind: &str,
    name: &str,
) -> Result<v1::Object, tonic::Status> {
    c.get(v1::GetRequest {
        kind: kind.into(),
        namespace: String::new(),
        name: name.into(),
    })
    .await
    .map(|r| r.into_inner())
}

fn results(r: &v1::ApplyResponse) -> Vec<String> {
    r.applied
        .iter()
        .map(|a| format!("{} {}", a.name, a.result))
        .collect()
}

#[tokio::test]
async fn apply_get_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;

    let r = apply(
        &mut c,
        vec![
            service("web", "198.19.0.1"),
            workload("web-1", "web", "198.18.0.2", 1),
        ],
    )
    .await
    .unwrap();
    assert_eq!(results(&r), ["web created", "web-1 created"]);
    let r2 = apply(&mut c, vec![service("web", "198.19.0.1")])
        .await
        .unwrap();
    assert_eq!(results(&r2), ["web unchanged"]);
    assert_eq!(
        r2.version, r.version,
        "an unchanged apply keeps the version"
    );
    let r3 = apply(&mut c, vec![service("web", "198.19.0.9")])
        .await
        .unwrap();
    assert_eq!(results(&r3), ["web configured"]);
    assert!(r3.version > r.version);

    let got = get(&mut c, "Service", "web").await.unwrap();
    let meta = got.metadata.as_ref().unwrap();
    assert_eq!(
        (
            meta.namespace.as_str(),
            meta.generation,
            meta.source.as_str()
        ),
        ("default", 2, "api")
    );
    let spec = json_from_struct(got.spec.as_ref().unwrap());
    assert_eq!(spec["vips"], json!(["198.19.0.9"]));
    assert_eq!(spec["ports"][0]["protocol"], "http");

    let list = c
        .list(v1::ListRequest {
            kind: "workloads".into(),
            namespace: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.objects.len(), 1);
    let all = c
        .list(v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.objects.len(), 2);
    let other_ns = c
        .list(v1::ListRequest {
            kind: String::new(),
            namespace: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other_ns.objects.is_empty());

    let d = c
        .delete(v1::DeleteRequest {
            objects: vec![v1::ObjectRef {
                kind: "Service".into(),
                name: "web".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted[0].result, "deleted");
    assert_eq!(
        get(&mut c, "Service", "web").await.unwrap_err().code(),
        Code::NotFound
    );
    let again = c
        .delete(v1::DeleteRequest {
            objects: vec![v1::ObjectRef {
                kind: "Service".into(),
                name: "web".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert!(
        again.message().contains("Service default/web not found"),
        "{}",
        again.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_apply_is_refused_with_every_problem_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    let bad_workload = workload("web-1", "web", "not-an-ip", 1);
    let mut bad_service = service("api", "198.19.0.2");
    bad_service.spec = struct_from_json(
        &json!({"vips": ["198.19.0.2"], "ports": [{"port": 8080, "protocol": "htp"}]}),
    );
    let err = apply(
        &mut c,
        vec![service("web", "198.19.0.1"), bad_workload, bad_service],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let msg = err.message();
    assert!(
        msg.contains("Workload default/web-1: spec.address: \"not-an-ip\" is not an IP address"),
        "{msg}"
    );
    assert!(
        msg.contains("Service default/api: spec.ports[0].protocol: unknown protocol \"htp\""),
        "{msg}"
    );
    let all = c
        .list(v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        all.objects.is_empty(),
        "nothing of a refused apply is stored"
    );

    // Cross-object rule: two services may not share a virtual IP and port.
    apply(&mut c, vec![service("web", "198.19.0.1")])
        .await
        .unwrap();
    let err = apply(&mut c, vec![service("other", "198.19.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("already used by Service default/web"),
        "{}",
        err.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn store_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    let v = apply(&mut c, vec![service("web", "198.19.0.1")])
        .await
        .unwrap()
        .version;
    server.shutdown().await;

    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    // What was stored comes back, not just something under that name.
    let web = get(&mut c, "Service", "web").await.unwrap();
    let spec = json_from_struct(web.spec.as_ref().unwrap());
    assert_eq!(spec["vips"], json!(["198.19.0.1"]));
    assert_eq!(spec["ports"][0]["port"], 8080);
    assert_eq!(spec["selector"], json!({"app": "web"}));
    let v2 = apply(&mut c, vec![workload("web-1", "web", "198.18.0.2", 1)])
        .await
        .unwrap()
        .version;
    assert!(v2 > v, "versions keep increasing across restarts");
    server.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_store_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("objects.json"), "{not json").unwrap();
    let err = Server::start(&Config::for_tests(dir.path()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("is corrupt"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_binary(dir: &Path, port: u16) -> Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_muon-control"))
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .arg("--insecure-plaintext")
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Child(child)
}

async fn connect_retrying(port: u16) -> ManagementClient<Channel> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match ManagementClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("muon-control not up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn applied_objects_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_binary(dir.path(), port);
    let mut c = connect_retrying(port).await;
    apply(
        &mut c,
        vec![
            service("web", "198.19.0.1"),
            workload("web-1", "web", "198.18.0.2", 1),
        ],
    )
    .await
    .unwrap();
    child.0.kill().unwrap(); // SIGKILL: no shutdown path runs
    child.0.wait().unwrap();
    drop(c);

    let port = free_port();
    let _child = spawn_binary(dir.path(), port);
    let mut c = connect_retrying(port).await;
    // What was stored comes back whole, not just something under those names.
    let web = get(&mut c, "Service", "web").await.unwrap();
    let spec = json_from_struct(web.spec.as_ref().unwrap());
    assert_eq!(spec["vips"], json!(["198.19.0.1"]));
    assert_eq!(spec["ports"][0]["port"], 8080);
    let w = get(&mut c, "Workload", "web-1").await.unwrap();
    let labels = &w.metadata.as_ref().unwrap().labels;
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    let spec = json_from_struct(w.spec.as_ref().unwrap());
    assert_eq!(spec["address"], "198.18.0.2");
    assert_eq!(spec["serviceAccount"], "web");
}

#[tokio::test]
async fn config_dir_objects_appear_and_a_bad_file_keeps_the_last_good_ones() {
    let data = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let file = conf.path().join("mesh.yaml");
    let good = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: files}
spec: {vips: [198.19.0.7], ports: [{port: 80}], selector: {app: files}}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: files-1, labels: {app: files}}
spec: {address: 198.18.0.7}
";
    std::fs::write(&file, good).unwrap();
    let mut config = Config::for_tests(data.path());
    config.config_dir = Some(conf.path().to_path_buf());
    let server = Server::start(&config).await.unwrap();
    let mut c = mgmt(&server).await;

    let got = eventually(|| {
        let mut c = c.clone();
        async move { get(&mut c, "Service", "files").await.ok() }
    })
    .await;
    assert_eq!(got.metadata.unwrap().source, "file");

    let err = c
        .delete(v1::DeleteRequest {
            objects: vec![v1::ObjectRef {
                kind: "Service".into(),
                name: "files".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = apply(&mut c, vec![service("files", "198.19.0.8")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A broken edit is ignored: the last good objects stay. A second file written after it
    // tells when the watcher has read the directory since the broken edit (it reads every
    // file at each poll).
    std::fs::write(&file, good.replace("198.18.0.7", "nowhere")).unwrap();
    std::fs::write(
        conf.path().join("marker.yaml"),
        "apiVersion: muon.io/v1alpha1\nkind: Service\nmetadata: {name: marker}\n\
         spec: {vips: [198.19.0.9], ports: [{port: 81}], selector: {app: marker}}\n",
    )
    .unwrap();
    eventually(|| {
        let mut c = c.clone();
        async move { get(&mut c, "Service", "marker").await.ok() }
    })
    .await;
    let kept = get(&mut c, "Workload", "files-1").await.unwrap();
    assert_eq!(
        json_from_struct(kept.spec.as_ref().unwrap())["address"],
        "198.18.0.7",
        "the last good version stays"
    );

    // A good edit is picked up.
    std::fs::write(&file, good.replace("198.18.0.7", "198.18.0.8")).unwrap();
    eventually(|| {
        let mut c = c.clone();
        async move {
            let o = get(&mut c, "Workload", "files-1").await.ok()?;
            (json_from_struct(o.spec.as_ref()?)["address"] == "198.18.0.8").then_some(())
        }
    })
    .await;
    server.shutdown().await;
}

async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery

/// A simulated sidecar: one discovery stream.
struct Proxy {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node_sent: bool,
}

impl Proxy {
    async fn connect(server: &Server) -> Proxy {
        let mut client = DiscoveryClient::connect(format!("http://{}", server.grpc_addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Proxy {
            tx,
            rx,
            node_sent: false,
        }
    }

    async fn send(&mut self, mut req: DiscoveryRequest) {
        if !self.node_sent {
            req.node = Some(v1::Node {
                id: "web-1.default".into(),
                pod: "web-1".into(),
                namespace: "default".into(),
                service_account: "web".into(),
                version: "test".into(),
                ..Default::default()
            });
            self.node_sent = true;
        }
        self.tx.send(req).await.unwrap();
    }

    async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .unwrap()
            .unwrap()
    }

    async fn expect_nothing(&mut self, wait: Duration) {
        if let Ok(m) = tokio::time::timeout(wait, self.rx.message()).await {
            panic!("unexpected response: {m:?}");
        }
    }

    async fn ack(&mut self, r: &DiscoveryResponse) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            version_info: r.version_info.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&mut self, r: &DiscoveryResponse, message: &str) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(v1::ErrorDetail {
                message: message.into(),
                resources: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn endpoints(r: &v1::Resource) -> &v1::Endpoints {
    match &r.kind {
        Some(v1::resource::Kind::Endpoints(e)) => e,
        other => panic!("not endpoints: {other:?}"),
    }
}

async fn mesh(server: &Server) -> ManagementClient<Channel> {
    let mut c = mgmt(server).await;
    apply(
        &mut c,
        vec![
            service("web", "198.19.0.1"),
            service("api", "198.19.0.2"),
            workload("web-1", "web", "198.18.0.2", 1),
            workload("web-2", "web", "198.18.0.3", 1),
            workload("api-1", "api", "198.18.0.4", 1),
        ],
    )
    .await
    .unwrap();
    // Let the debouncer publish the snapshot.
    eventually(|| async {
        (server.registry.snapshot().kinds[ResourceKind::Endpoints].len() == 2).then_some(())
    })
    .await;
    c
}

async fn proxy_states(c: &mut ManagementClient<Channel>) -> Vec<(String, String, String)> {
    let r = c
        .list_proxies(v1::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    r.proxies
        .iter()
        .flat_map(|p| {
            p.kinds
                .iter()
                .map(|k| (k.type_url.clone(), k.state.clone(), k.last_error.clone()))
        })
        .collect()
}

#[tokio::test]
async fn discovery_sends_full_state_then_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mesh(&server).await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::ENDPOINTS, &["*"]).await;
    let first = p.recv().await;
    assert_eq!(first.type_url, kinds::ENDPOINTS);
    assert_eq!(names(&first), ["api.default", "web.default"]);
    let web = endpoints(&first.resources[1]);
    assert_eq!(web.endpoints.len(), 2);
    assert_eq!(
        web.endpoints[0].identity,
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(web.endpoints[0].locality.as_ref().unwrap().zone, "z1");
    assert!(web.endpoints[0].ready);
    p.ack(&first).await;

    // One workload of web changes: only web's endpoints are sent.
    apply(&mut c, vec![workload("web-2", "web", "198.18.0.3", 5)])
        .await
        .unwrap();
    let update = p.recv().await;
    assert_eq!(names(&update), ["web.default"]);
    assert!(update.removed_resources.is_empty());
    assert_eq!(endpoints(&update.resources[0]).endpoints[1].weight, 5);
    assert_ne!(update.nonce, first.nonce);
    assert!(
        update.version_info.parse::<u64>().unwrap() > first.version_info.parse::<u64>().unwrap()
    );
    p.ack(&update).await;

    // A deleted service: its name is removed.
    c.delete(v1::DeleteRequest {
        objects: vec![v1::ObjectRef {
            kind: "Service".into(),
            name: "api".into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let removal = p.recv().await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, ["api.default"]);
    p.ack(&removal).await;
    server.shutdown().await;
}

#[tokio::test]
async fn ack_makes_a_proxy_synced_and_nack_shows_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mesh(&server).await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::SERVICES, &["*"]).await;
    let r = p.recv().await;
    assert_eq!(names(&r), ["api.default", "web.default"]);
    eventually(|| {
        let mut c = c.clone();
        async move {
            let s = proxy_states(&mut c).await;
            (s.first().map(|s| s.1.as_str()) == Some("STALE")).then_some(())
        }
    })
    .await;
    p.ack(&r).await;
    eventually(|| {
        let mut c = c.clone();
        async move {
            (proxy_states(&mut c).await == [("services".into(), "SYNCED".into(), String::new())])
                .then_some(())
        }
    })
    .await;
    let listed = c
        .list_proxies(v1::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let proxy = &listed.proxies[0];
    assert_eq!(
        (proxy.id.as_str(), proxy.service_account.as_str()),
        ("web-1.default", "web")
    );
    assert_eq!(proxy.kinds[0].acked_version, r.version_info);

    apply(&mut c, vec![service("web", "198.19.0.9")])
        .await
        .unwrap();
    let r2 = p.recv().await;
    p.nack(&r2, "web.default: vip 198.19.0.9 is not usable")
        .await;
    eventually(|| {
        let mut c = c.clone();
        async move {
            let s = proxy_states(&mut c).await;
            (s[0].1 == "NACKED").then_some(())
        }
    })
    .await;
    let listed = c
        .list_proxies(v1::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let k = &listed.proxies[0].kinds[0];
    assert_eq!(k.last_error, "web.default: vip 198.19.0.9 is not usable");
    assert_eq!(
        k.acked_version, r.version_info,
        "a NACK keeps the acked version"
    );
    assert_eq!(k.sent_version, r2.version_info);
    assert!(k.last_nack_at.is_some());
    assert!(server
        .metrics
        .encode()
        .contains("muon_control_nacks_total{type_url=\"services\"} 1"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_proxy_gets_only_the_latest_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mesh(&server).await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::ENDPOINTS, &["*"]).await;
    let first = p.recv().await;

    // The proxy does not ACK (it is busy): five separate changes happen meanwhile, each
    // published as a snapshot of its own before the next one.
    for weight in 2..=6 {
        let r = apply(&mut c, vec![workload("web-1", "web", "198.18.0.2", weight)])
            .await
            .unwrap();
        published(&server, r.version).await;
    }

    // Once it ACKs, it gets one response with the newest state, not five: the stream is
    // ordered, so anything sent while it held its ACK would come first.
    p.ack(&first).await;
    let latest = p.recv().await;
    assert_eq!(names(&latest), ["web.default"]);
    assert_eq!(endpoints(&latest.resources[0]).endpoints[0].weight, 6);
    p.ack(&latest).await;
    // Nothing is queued behind it: the next change is the next response.
    apply(&mut c, vec![workload("web-1", "web", "198.18.0.2", 7)])
        .await
        .unwrap();
    let next = p.recv().await;
    assert_eq!(endpoints(&next.resources[0]).endpoints[0].weight, 7);
    server.shutdown().await;
}

/// Waits until the debouncer has published a snapshot with the store's `version` (or later).
async fn published(server: &Server, version: u64) {
    eventually(|| async { (server.registry.snapshot().version >= version).then_some(()) }).await;
}

/// Resources discovery streams compared to work out their pushes, over all kinds.
fn compared(server: &Server) -> u64 {
    let text = server.metrics.encode();
    text.lines()
        .filter(|l| l.starts_with("muon_control_discovery_compared_resources_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_change_to_one_service_compares_and_sends_only_that_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    let services = 20;
    let mut objects = Vec::new();
    for i in 0..services {
        let name = format!("s{i:02}");
        objects.push(service(&name, &format!("198.19.1.{i}")));
        objects.push(workload(
            &format!("{name}-1"),
            &name,
            &format!("198.18.1.{i}"),
            1,
        ));
    }
    apply(&mut c, objects).await.unwrap();
    eventually(|| async {
        (server.registry.snapshot().kinds[ResourceKind::Endpoints].len() == services).then_some(())
    })
    .await;

    let mut p = Proxy::connect(&server).await;
    for kind in kinds::ALL {
        p.subscribe(kind, &["*"]).await;
    }
    for _ in kinds::ALL {
        let r = p.recv().await;
        p.ack(&r).await;
    }

    // One service's endpoints change: that one resource is compared and sent, and no other
    // kind sends anything (the stream is ordered: anything else sent before it or with it
    // would be seen here).
    let before = compared(&server);
    apply(&mut c, vec![workload("s07-1", "s07", "198.18.1.7", 2)])
        .await
        .unwrap();
    let update = p.recv().await;
    assert_eq!(update.type_url, kinds::ENDPOINTS);
    assert_eq!(names(&update), ["s07.default"]);
    assert!(update.removed_resources.is_empty());
    p.ack(&update).await;
    assert_eq!(compared(&server) - before, 1);

    // Two changes while the proxy holds its ACK, each published as a snapshot of its own
    // (it skips one): the push compares and sends just those two.
    let before = compared(&server);
    apply(&mut c, vec![workload("s03-1", "s03", "198.18.1.3", 3)])
        .await
        .unwrap();
    let first = p.recv().await;
    assert_eq!(names(&first), ["s03.default"]);
    for (name, ip) in [("s11", "198.18.1.11"), ("s15", "198.18.1.15")] {
        let r = apply(&mut c, vec![workload(&format!("{name}-1"), name, ip, 3)])
            .await
            .unwrap();
        published(&server, r.version).await;
    }
    p.ack(&first).await;
    let latest = p.recv().await;
    assert_eq!(names(&latest), ["s11.default", "s15.default"]);
    p.ack(&latest).await;
    assert_eq!(compared(&server) - before, 3);
    // Nothing else was queued: the next change is the next response, and it compares one.
    let before = compared(&server);
    apply(&mut c, vec![workload("s19-1", "s19", "198.18.1.19", 4)])
        .await
        .unwrap();
    let next = p.recv().await;
    assert_eq!(names(&next), ["s19.default"]);
    assert_eq!(compared(&server) - before, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn on_demand_subscription_returns_just_that_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mesh(&server).await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::ENDPOINTS, &["web.default"]).await;
    let r = p.recv().await;
    assert_eq!(names(&r), ["web.default"]);
    p.ack(&r).await;

    // A change to a service it did not subscribe to sends nothing.
    apply(&mut c, vec![workload("api-1", "api", "198.18.0.4", 3)])
        .await
        .unwrap();
    p.expect_nothing(Duration::from_millis(300)).await;

    // Subscribing later adds just that one; an unknown name is answered as removed.
    p.subscribe(kinds::ENDPOINTS, &["api.default", "nope.default"])
        .await;
    let r = p.recv().await;
    assert_eq!(names(&r), ["api.default"]);
    assert_eq!(r.removed_resources, ["nope.default"]);
    assert_eq!(endpoints(&r.resources[0]).endpoints[0].weight, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_without_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut p = Proxy::connect(&server).await;
    p.node_sent = true; // pretend: the first request goes without node
    p.subscribe(kinds::SERVICES, &["*"]).await;
    let err = tokio::time::timeout(WAIT, p.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_management_and_discovery() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response: {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"muon.v1.Management"), "{names:?}");
    assert!(names.contains(&"muon.v1.Discovery"), "{names:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_ready_and_live_are_served_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let _c = mesh(&server).await;
    for (path, want) in [
        ("/metrics", "muon_control_objects{kind=\"Workload\"} 3"),
        ("/ready", "ready"),
        ("/live", "live"),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.metrics_addr)
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(want), "{want} not in {body}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn watch_streams_applies_and_deletes_of_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    let mut events = c
        .watch(v1::WatchRequest {
            kind: "Service".into(),
        })
        .await
        .unwrap()
        .into_inner();
    apply(
        &mut c,
        vec![
            workload("web-1", "web", "198.18.0.2", 1),
            service("web", "198.19.0.1"),
        ],
    )
    .await
    .unwrap();
    c.delete(v1::DeleteRequest {
        objects: vec![v1::ObjectRef {
            kind: "Service".into(),
            name: "web".into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let applied = tokio::time::timeout(WAIT, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(applied.r#type, "applied");
    assert_eq!(applied.object.unwrap().metadata.unwrap().name, "web");
    let deleted = tokio::time::timeout(WAIT, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(deleted.r#type, "deleted");
    assert!(deleted.version > applied.version);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Limits, addresses, split responses, per-resource NACKs (issue 8)

#[tokio::test]
async fn oversized_objects_and_applies_are_refused_with_their_size_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    // A Workload with 150,000 labels: about 5 MB, over the 1 MiB default.
    let labels: serde_json::Map<String, Value> = (0..150_000)
        .map(|i| (format!("k{i}"), json!("v")))
        .collect();
    let big = obj(json!({
        "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": "big", "labels": labels},
        "spec": {"address": "198.18.0.9"}
    }));
    let err = apply(&mut c, vec![big]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("Workload default/big: the object is")
            && err
                .message()
                .contains("the limit is 1.0 MiB (--max-object-bytes)"),
        "{}",
        err.message()
    );
    // Nothing was stored, and what is stored reads back.
    assert!(get(&mut c, "Workload", "big").await.is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn a_vip_may_not_be_a_workloads_or_the_control_planes_address_nor_outside_the_service_cidr() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.service_cidrs = vec!["198.19.0.0/16".parse().unwrap()];
    let server = Server::start(&config).await.unwrap();
    let mut c = mgmt(&server).await;
    apply(&mut c, vec![workload("web-1", "web", "198.18.0.2", 1)])
        .await
        .unwrap();
    for (vip, want) in [
        (
            "198.18.0.2",
            "spec.vips[0]: 198.18.0.2 is the address of Workload default/web-1",
        ),
        (
            "10.0.0.1",
            "spec.vips[0]: 10.0.0.1 is outside the service CIDRs (198.19.0.0/16; --service-cidr)",
        ),
        ("127.0.0.1", "spec.vips[0]: 127.0.0.1 is a loopback address"),
        (
            "224.0.0.1",
            "spec.vips[0]: 224.0.0.1 is a multicast address",
        ),
    ] {
        let err = apply(&mut c, vec![service("web", vip)]).await.unwrap_err();
        assert!(
            err.message().contains("Service default/web") && err.message().contains(want),
            "{vip}: {}",
            err.message()
        );
    }
    apply(&mut c, vec![service("web", "198.19.0.1")])
        .await
        .unwrap();
    // And the other way round: a workload at a service's VIP.
    let err = apply(&mut c, vec![workload("thief", "x", "198.19.0.1", 1)])
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("Workload default/thief: spec.address: 198.19.0.1 is a virtual IP of Service default/web"),
        "{}",
        err.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_large_list_comes_back_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    // 100 workloads of about 100 KiB each: 10 MB, more than one page (4 MiB).
    for batch in 0..4 {
        let objects = (0..25)
            .map(|i| {
                let n = batch * 25 + i;
                let labels: serde_json::Map<String, Value> = (0..4000)
                    .map(|j| (format!("label-{j}"), json!("value-x")))
                    .collect();
                obj(json!({
                    "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
                    "metadata": {"name": format!("w-{n:03}"), "labels": labels},
                    "spec": {"address": format!("198.18.1.{}", n + 1)}
                }))
            })
            .collect();
        apply(&mut c, objects).await.unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .list(v1::ListRequest {
                kind: "Workload".into(),
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        names.extend(r.objects.iter().map(|o| o.metadata.clone().unwrap().name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(names.len(), 100);
    assert_eq!(names[0], "w-000");
    assert_eq!(names[99], "w-099");
    server.shutdown().await;
}

#[tokio::test]
async fn a_response_over_the_split_size_comes_in_parts_that_count_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.discovery_split_bytes = 100;
    let server = Server::start(&config).await.unwrap();
    let mut c = mgmt(&server).await;
    let services: Vec<v1::Object> = (0..10)
        .map(|i| service(&format!("s{i}"), &format!("198.19.0.{}", i + 1)))
        .collect();
    apply(&mut c, services).await.unwrap();
    eventually(|| async {
        (server.registry.snapshot().kinds[ResourceKind::Services].len() == 10).then_some(())
    })
    .await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::SERVICES, &["*"]).await;
    let mut got = Vec::new();
    let mut parts = 0;
    loop {
        let r = p.recv().await;
        parts += 1;
        got.extend(names(&r).into_iter().map(String::from));
        p.ack(&r).await;
        if !r.continues {
            break;
        }
    }
    assert!(parts >= 5, "{parts} parts");
    got.sort();
    assert_eq!(got.len(), 10, "{got:?}");
    // Only the last part's ACK counts: the proxy is SYNCED once it is in.
    eventually(|| {
        let mut c = c.clone();
        async move {
            (proxy_states(&mut c).await == [("services".into(), "SYNCED".into(), String::new())])
                .then_some(())
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_resource_stays_nacked_until_a_version_of_it_is_accepted_or_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = mgmt(&server).await;
    apply(
        &mut c,
        vec![service("web", "198.19.0.1"), service("api", "198.19.0.2")],
    )
    .await
    .unwrap();
    eventually(|| async {
        (server.registry.snapshot().kinds[ResourceKind::Services].len() == 2).then_some(())
    })
    .await;
    let mut p = Proxy::connect(&server).await;
    p.subscribe(kinds::SERVICES, &["*"]).await;
    let r = p.recv().await;
    // The sidecar refuses web and takes api.
    p.send(DiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(v1::ErrorDetail {
            message: "web.default: cannot use it".into(),
            resources: vec!["web.default".into()],
        }),
        ..Default::default()
    })
    .await;
    let state = |c: &ManagementClient<Channel>, want: &'static str, err: &'static str| {
        let mut c = c.clone();
        async move {
            let s = proxy_states(&mut c).await;
            (s == [("services".into(), want.into(), err.into())]).then_some(())
        }
    };
    eventually(|| state(&c, "NACKED", "web.default: cannot use it")).await;
    // An unrelated change is ACKed: web is still refused, so still NACKED.
    apply(&mut c, vec![service("api", "198.19.0.3")])
        .await
        .unwrap();
    let r = p.recv().await;
    assert_eq!(names(&r), ["api.default"]);
    p.ack(&r).await;
    eventually(|| state(&c, "NACKED", "web.default: cannot use it")).await;
    // web is deleted: its error goes with it.
    c.delete(v1::DeleteRequest {
        objects: vec![v1::ObjectRef {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web".into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let r = p.recv().await;
    assert_eq!(r.removed_resources, ["web.default"]);
    p.ack(&r).await;
    eventually(|| state(&c, "SYNCED", "")).await;
    server.shutdown().await;
}
