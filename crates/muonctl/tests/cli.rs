//! The real `muonctl` binary against a tiny in-process fake Management server: one Apply
//! for every object of every document, INVALID_ARGUMENT printed as the server wrote it, and
//! a short, actionable error when nothing listens.

use muon_api::v1::management_server::{Management, ManagementServer};
use muon_api::v1::*;
use std::process::Command;
use std::sync::{Arc, Mutex};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_muonctl");

#[derive(Default, Clone)]
struct Fake {
    applies: Arc<Mutex<Vec<ApplyRequest>>>,
}

#[tonic::async_trait]
impl Management for Fake {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let req = req.into_inner();
        self.applies.lock().unwrap().push(req.clone());
        if req
            .objects
            .iter()
            .any(|o| o.metadata.as_ref().unwrap().name == "bad")
        {
            return Err(Status::invalid_argument(
                "Service shop/bad: spec.vips[0]: \"x\" is not an IP address",
            ));
        }
        let applied = req
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let m = o.metadata.clone().unwrap();
                ObjectRef {
                    kind: o.kind.clone(),
                    namespace: if m.namespace.is_empty() {
                        "default".into()
                    } else {
                        m.namespace
                    },
                    name: m.name,
                    result: ["created", "configured", "unchanged"][i % 3].into(),
                }
            })
            .collect();
        Ok(Response::new(ApplyResponse {
            applied,
            version: 1,
        }))
    }
    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("no"))
    }
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<Object>, Status> {
        Err(Status::not_found("Service default/nope not found"))
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse::default()))
    }
    async fn list_proxies(
        &self,
        _: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        Ok(Response::new(ListProxiesResponse::default()))
    }
    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("no"))
    }
}

fn serve(fake: Fake) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ManagementServer::new(fake))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (format!("http://{addr}"), rt)
}

fn muonctl(cp: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--control-plane")
        .arg(cp)
        .args(args)
        .env_remove("MUON_CONTROL_PLANE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MANIFEST: &str = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {vips: [198.19.0.1], ports: [{port: 80}], selector: {app: web}}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: web-0, labels: {app: web}}
spec: {address: 198.18.0.2}
";

#[test]
fn apply_sends_every_document_in_one_request_and_prints_each_result() {
    let fake = Fake::default();
    let (cp, _rt) = serve(fake.clone());
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, MANIFEST).unwrap();
    std::fs::write(
        &b,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {parentRefs: [{name: web}]}\n",
    )
    .unwrap();
    let (ok, out, err) = muonctl(
        &cp,
        &[
            "apply",
            "-f",
            a.to_str().unwrap(),
            "-f",
            b.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "service/web.default created\nworkload/web-0.default configured\nhttproute/r.shop unchanged\n"
    );
    let applies = fake.applies.lock().unwrap();
    assert_eq!(applies.len(), 1, "one Apply for everything");
    assert_eq!(applies[0].objects.len(), 3);
}

#[test]
fn invalid_argument_is_printed_as_the_server_wrote_it() {
    let (cp, _rt) = serve(Fake::default());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, MANIFEST.replace("name: web}", "name: bad}")).unwrap();
    let (ok, _, err) = muonctl(&cp, &["apply", "-f", f.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "muonctl: Service shop/bad: spec.vips[0]: \"x\" is not an IP address"
    );
    let (ok, _, err) = muonctl(&cp, &["get", "services", "nope"]);
    assert!(!ok);
    assert_eq!(err.trim(), "muonctl: Service default/nope not found");
    let (ok, out, _) = muonctl(&cp, &["proxy-status"]);
    assert!(ok);
    assert_eq!(out, "no proxies connected\n");
}

#[test]
fn unreachable_control_plane_says_what_to_do() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cp = format!("http://127.0.0.1:{port}");
    let (ok, _, err) = muonctl(&cp, &["get", "services"]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("muonctl: cannot reach the control plane at {cp}: connection refused (is muon-control running? set --control-plane)")
    );
}
