//! The small HTTP/1.1 server on `--metrics-addr`: `/metrics` (Prometheus text) and `/ready`.

use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Concurrent connections; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown` fires. Ready while not shutting down.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    continue;
                }
                let metrics = metrics.clone();
                let ready = shutdown.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let resp = route(&req, &metrics, !*ready.borrow());
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    if let Err(e) = served {
                        debug!(error = %e, "metrics connection ended");
                    }
                });
            }
        }
    }
}

fn route<B>(req: &Request<B>, metrics: &Metrics, ready: bool) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let (status, ctype, body) = match (get, req.uri().path()) {
        (true, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        (true, "/ready") if ready => (StatusCode::OK, "text/plain", "ready\n".into()),
        (true, "/ready") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        (false, "/metrics" | "/ready") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}
