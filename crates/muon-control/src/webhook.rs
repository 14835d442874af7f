//! The admission webhook (`--webhook-addr`, HTTPS, `POST /inject`): the Kubernetes API server
//! sends an AdmissionReview (`admission.k8s.io/v1`) for every pod created in a namespace that
//! opted in, and gets back the RFC 6902 patch that injects Muon's init container and sidecar.
//!
//! The patch is the difference between the pod it was sent and the pod `muon-inject` makes of
//! it, the library `muonctl inject` uses too, so the two never disagree. The webhook never
//! blocks a pod: every answer to a well-formed review is `allowed: true` (a pod that cannot be
//! injected is admitted as it is, with a warning the client shows); only a body that is not
//! an AdmissionReview gets an HTTP error (400), which the API server treats per the
//! webhook's `failurePolicy` (Ignore: the pod is created without a sidecar).
//!
//! [`review`] is the decision, pure; [`serve`] is the HTTPS server around it: at most
//! [`MAX_CONNECTIONS`] connections, a TLS handshake deadline, bodies bounded by
//! [`MAX_BODY_BYTES`].

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use muon_http::{respond, text};
use muon_inject::{Outcome, Template};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// The largest request body read: an AdmissionReview holds one pod (the API server's own
/// limit for an object is 1.5 MiB in etcd, plus the review's envelope).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Concurrent connections; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The path the MutatingWebhookConfiguration names.
pub const PATH: &str = "/inject";

/// `--webhook-addr`, `--webhook-cert`, `--webhook-key` and the injection template.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub template: Template,
}

/// An answer that is not a review: the status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: StatusCode,
    pub message: String,
}

fn bad_request(message: impl Into<String>) -> Rejected {
    Rejected {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// The answer to one AdmissionReview body: the response review (always `allowed: true`), or
/// why the body is not a review.
pub fn review(body: &[u8], template: &Template) -> Result<Value, Rejected> {
    let review: Value = serde_json::from_slice(body).map_err(|e| {
        bad_request(format!(
            "the body is not JSON ({e}): POST an AdmissionReview (admission.k8s.io/v1)"
        ))
    })?;
    let api = review.get("apiVersion").and_then(Value::as_str);
    let kind = review.get("kind").and_then(Value::as_str);
    if api != Some("admission.k8s.io/v1") || kind != Some("AdmissionReview") {
        return Err(bad_request(format!(
            "expected an AdmissionReview of admission.k8s.io/v1, got kind {} of {}",
            kind.unwrap_or("(none)"),
            api.unwrap_or("(no apiVersion)")
        )));
    }
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| bad_request("the AdmissionReview has no request"))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad_request("the AdmissionReview's request has no uid"))?;
    let mut response = json!({"uid": uid, "allowed": true});
    let field = |path: &str| request.pointer(path).and_then(Value::as_str).unwrap_or("");
    let is_pod_create = field("/kind/kind") == "Pod"
        && field("/kind/group").is_empty()
        && field("/operation") == "CREATE"
        && field("/subResource").is_empty();
    let pod = request.get("object").filter(|o| o.is_object());
    match (is_pod_create, pod) {
        (false, _) => debug!(uid, "not a pod being created: allowed as it is"),
        (true, None) => {
            response["warnings"] = json!(["muon: the review carries no pod: not injected"]);
        }
        (true, Some(pod)) => match muon_inject::inject_pod_object(pod, template) {
            Ok((injected, Outcome::Injected(mode))) => {
                let ops = muon_inject::patch::diff(pod, &injected);
                let patch = serde_json::to_vec(&ops).unwrap_or_default();
                response["patchType"] = "JSONPatch".into();
                response["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(patch)
                    .into();
                info!(
                    uid,
                    namespace = field("/namespace"),
                    pod = %muon_inject::workload::describe(pod),
                    mode = mode.as_str(),
                    "injected"
                );
            }
            Ok((_, outcome)) => debug!(uid, outcome = %outcome.describe(), "not injected"),
            Err(problems) => {
                warn!(uid, problems = %problems.join("; "), "cannot inject: admitted as it is");
                response["warnings"] = problems
                    .iter()
                    .map(|p| Value::from(format!("muon: not injected: {p}")))
                    .collect();
            }
        },
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The serving TLS configuration: the certificate chain and key (PEM) the API server checks
/// against the webhook configuration's caBundle; TLS 1.2 and 1.3, HTTP/1.1.
pub fn tls_config(config: &WebhookConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("--webhook-cert {}", config.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--webhook-cert {}: no certificate in it",
        config.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .with_context(|| format!("--webhook-key {}", config.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--webhook-cert and --webhook-key do not make a certificate")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Serves the webhook on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    template: Arc<Template>,
    mut stop: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admission webhook serving https://{addr}{PATH}");
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    debug!(%remote, "too many webhook connections; closing");
                    continue;
                }
                let acceptor = acceptor.clone();
                let template = template.clone();
                conns.spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return debug!(%remote, error = %e, "webhook TLS handshake failed"),
                        Err(_) => return debug!(%remote, "webhook TLS handshake timed out"),
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let template = template.clone();
                        async move { Ok::<_, Infallible>(handle(req, &template).await) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HANDSHAKE_TIMEOUT)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                    if let Err(e) = served {
                        debug!(%remote, error = %e, "webhook connection ended");
                    }
                });
            }
        }
    }
}

async fn handle(req: Request<hyper::body::Incoming>, template: &Template) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the webhook serves POST /inject\n",
        );
    }
    if req.method() != Method::POST {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return resp;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain; charset=utf-8",
                format!("the body is larger than {MAX_BODY_BYTES} bytes\n"),
            )
        }
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                format!("reading the body: {e}\n"),
            )
        }
    };
    match review(&body, template) {
        Ok(answer) => respond(StatusCode::OK, "application/json", answer.to_string()),
        Err(r) => {
            debug!(status = %r.status, message = %r.message, "not an AdmissionReview");
            respond(
                r.status,
                "text/plain; charset=utf-8",
                format!("{}\n", r.message),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        }))
        .unwrap()
    }

    fn pod_request(pod: Value) -> Value {
        json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        })
    }

    fn decode_patch(response: &Value) -> Vec<Value> {
        let b64 = response["patch"].as_str().expect("a patch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    #[test]
    fn a_pod_with_generate_name_gets_the_patch_the_library_makes() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "orders-7c9f-", "namespace": "shop"},
            "spec": {"containers": [{"name": "orders", "image": "orders:1"}]}});
        let answer = review(&body(pod_request(pod.clone())), &Template::default()).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        let r = &answer["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patched = muon_inject::patch::apply(&pod, &decode_patch(r)).unwrap();
        let (want, _) = muon_inject::inject_pod_object(&pod, &Template::default()).unwrap();
        assert_eq!(patched, want);
    }

    #[test]
    fn opted_out_injected_and_other_objects_are_allowed_without_a_patch() {
        let opted_out = json!({"metadata": {"name": "p", "labels": {"muon.io/inject": "disabled"}},
            "spec": {"containers": [{"name": "a", "image": "a"}]}});
        let mut update = pod_request(opted_out.clone());
        update["operation"] = "UPDATE".into();
        let mut service = pod_request(json!({"spec": {}}));
        service["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
        for request in [pod_request(opted_out), update, service] {
            let r = &review(&body(request), &Template::default()).unwrap()["response"];
            assert_eq!(r["allowed"], true);
            assert!(r.get("patch").is_none(), "{r}");
            assert!(r.get("warnings").is_none(), "{r}");
        }
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_allowed_with_a_warning() {
        let pod = json!({"metadata": {"name": "p", "annotations": {"muon.io/proxy-cpu": "lots"}},
            "spec": {"containers": [{"name": "a", "image": "a"}]}});
        let r = &review(&body(pod_request(pod)), &Template::default()).unwrap()["response"];
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        let w = r["warnings"][0].as_str().unwrap();
        assert!(
            w.starts_with("muon: not injected: annotation muon.io/proxy-cpu"),
            "{w}"
        );
    }

    #[test]
    fn bodies_that_are_not_reviews_are_refused_clearly() {
        let t = Template::default();
        let e = review(b"<html>", &t).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.starts_with("the body is not JSON"),
            "{}",
            e.message
        );
        let e = review(
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            &t,
        )
        .unwrap_err();
        assert!(
            e.message.contains("admission.k8s.io/v1beta1"),
            "{}",
            e.message
        );
        let e = review(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            &t,
        )
        .unwrap_err();
        assert_eq!(e.message, "the AdmissionReview has no request");
        let e = review(&body(json!({"kind": {"kind": "Pod"}})), &t).unwrap_err();
        assert_eq!(e.message, "the AdmissionReview's request has no uid");
    }
}
