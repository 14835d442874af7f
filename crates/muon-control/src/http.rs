//! The small HTTP/1.1 server on `--metrics-addr` (see `muon-http`): `/metrics` (Prometheus
//! text), `/ready` (not while shutting down) and `/live` (the process serves: Kubernetes'
//! liveness probe).

use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use muon_http::{respond, text, OPENMETRICS};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves until `shutdown` fires. Ready while not shutting down.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ready = shutdown.clone();
    let handler = move |req: Request<hyper::body::Incoming>| {
        let resp = route(&req, &metrics, !*ready.borrow());
        async move { resp }
    };
    tokio::select! {
        () = muon_http::serve(listener, "metrics", handler) => {}
        _ = shutdown.changed() => {}
    }
}

fn route<B>(req: &Request<B>, metrics: &Metrics, ready: bool) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match (get, req.uri().path()) {
        (true, "/metrics") => respond(StatusCode::OK, OPENMETRICS, metrics.encode()),
        (true, "/ready") if ready => text(StatusCode::OK, "ready\n"),
        (true, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (true, "/live") => text(StatusCode::OK, "live\n"),
        (false, "/metrics" | "/ready" | "/live") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
