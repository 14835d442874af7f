//! The two small HTTP/1.1 servers beside the data path (on `muon-http`).
//!
//! Health (pod-facing, `--health-addr`): `/live`, `/ready`, `/metrics`.
//! Admin (loopback, `--admin-addr`): `/config_dump`, `/ready`, `POST /drain`.
//! Every response carries `server: muon-proxy`; unknown paths get 404. Neither server ever
//! blocks the data path: they only read the shared routes, metrics and drain state.

use crate::config::{Config, DiscoveryMode};
use crate::discovery::{self, on_demand::OnDemand};
use crate::drain::{Drain, Phase};
use crate::metrics::Metrics;
use crate::table::SharedTable;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, SERVER};
use hyper::{Method, Request, Response, StatusCode};
use muon_http::OPENMETRICS;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::info;

/// Which of the two servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Health,
    Admin,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Health => "health",
            Kind::Admin => "admin",
        }
    }
}

/// What the handlers read.
pub struct State {
    pub table: SharedTable,
    /// Where `/config_dump` gets the resources as received.
    pub discovery: discovery::Handle,
    pub metrics: Arc<Metrics>,
    pub drain: Arc<Drain>,
    /// The effective flags, serialised once at start.
    pub flags: serde_json::Value,
    pub discovery_mode: DiscoveryMode,
    /// On demand: the endpoints subscriptions, for `/config_dump`.
    pub on_demand: Option<Arc<OnDemand>>,
    /// This sidecar's mesh identity, for `/certs`.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl State {
    pub fn new(
        config: &Config,
        table: SharedTable,
        discovery: discovery::Handle,
        metrics: Arc<Metrics>,
        drain: Arc<Drain>,
    ) -> Self {
        State {
            table,
            discovery,
            metrics,
            drain,
            flags: serde_json::to_value(config).unwrap_or_default(),
            discovery_mode: config.discovery_mode,
            on_demand: None,
            identity: None,
        }
    }

    /// Shows the data path's on-demand subscriptions in `/config_dump`.
    /// Shows this sidecar's certificate in `/certs`.
    pub fn with_identity(mut self, identity: Option<Arc<crate::identity::Identity>>) -> Self {
        self.identity = identity;
        self
    }

    pub fn with_on_demand(mut self, on_demand: Option<Arc<OnDemand>>) -> Self {
        self.on_demand = on_demand;
        self
    }

    /// Ready once a table is loaded (listeners are bound before the servers start) and
    /// until draining starts.
    pub fn ready(&self) -> bool {
        self.table.load().is_some() && self.drain.phase() == Phase::Serving
    }
}

/// Serves one of the servers until dropped (the server task aborts it at exit).
pub async fn serve(listener: TcpListener, kind: Kind, state: Arc<State>) {
    let handler = move |req: Request<Incoming>| {
        let state = state.clone();
        async move { route(kind, &state, &req).await }
    };
    muon_http::serve(listener, kind.as_str(), handler).await
}

/// The whole routing table of both servers.
pub async fn route(kind: Kind, state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match (kind, req.uri().path()) {
        (Kind::Health, "/live") if get => text(StatusCode::OK, "live\n"),
        (_, "/ready") if get => match state.ready() {
            true => text(StatusCode::OK, "ready\n"),
            false => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        },
        (Kind::Health, "/metrics") if get => {
            respond(StatusCode::OK, OPENMETRICS, state.metrics.encode())
        }
        (Kind::Admin, "/certs") if get => respond(StatusCode::OK, "application/json", certs(state)),
        (Kind::Admin, "/config_dump") if get => {
            respond(StatusCode::OK, "application/json", config_dump(state).await)
        }
        (Kind::Admin, "/drain") if req.method() == Method::POST => {
            if state.drain.start() {
                info!("drain requested through the admin API");
            }
            text(StatusCode::OK, "draining\n")
        }
        (Kind::Health, "/live" | "/ready" | "/metrics")
        | (Kind::Admin, "/ready" | "/config_dump") => method_not_allowed("GET, HEAD"),
        (Kind::Admin, "/drain") => method_not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `{"version": n, "source": "file"|"control-plane"|"saved"|null,
/// "table": {"services": [...], "inbound": [...]} | null,
/// "resources": {<kind>: {"version", "resources": [...]}} | null,
/// "discovery": {"mode": "all"|"on-demand", "subscribed": [names], "pending": [names]},
/// "flags": {...}}`. `table` is what the data path uses, `resources` what the control plane
/// sent (rendered now, on the discovery worker). `subscribed` and `pending` (not answered
/// yet) are the endpoints names subscribed on demand; both are absent in `all` mode.
pub async fn config_dump(state: &State) -> String {
    let routes = state.table.load_full();
    let resources = state.discovery.resources().await;
    let mut discovery = serde_json::json!({ "mode": state.discovery_mode });
    if let Some(od) = &state.on_demand {
        discovery["subscribed"] = od.subscribed().into();
        discovery["pending"] = od.pending().into();
    }
    let dump = serde_json::json!({
        "version": routes.as_ref().map_or(0, |r| r.version),
        "source": routes.as_ref().map(|r| r.source),
        "table": routes.as_ref().map(|r| r.dump()),
        "resources": resources,
        "discovery": discovery,
        "flags": &state.flags,
    });
    let mut body = serde_json::to_string_pretty(&dump).unwrap_or_default();
    body.push('\n');
    body
}

/// `/certs`: this sidecar's identity, its certificate's serial and validity, and the trust
/// bundle (`{"identity": null}` without one).
fn certs(state: &State) -> String {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let body = match state.identity.as_ref().and_then(|i| i.current()) {
        None => serde_json::json!({
            "identity": null,
            "configured": state.identity.is_some(),
        }),
        Some(c) => serde_json::json!({
            "identity": &*c.id,
            "serial": c.serial,
            "notBefore": secs(c.not_before),
            "notAfter": secs(c.not_after),
            "expiresInSeconds": c.not_after
                .duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs()),
            "chain": c.chain_pem,
            "trustBundle": c.bundle_pem,
        }),
    };
    let mut s = serde_json::to_string_pretty(&body).unwrap_or_default();
    s.push('\n');
    s
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = muon_http::respond(status, content_type, body);
    resp.headers_mut()
        .insert(SERVER, HeaderValue::from_static("muon-proxy"));
    resp
}
