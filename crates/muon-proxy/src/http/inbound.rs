//! One request arriving at this pod, to its app.
//!
//! A peer sidecar carries every request over its pooled HTTP/2 and says in
//! `x-muon-orig-proto` what its app spoke; the app here gets that protocol (an HTTP/1.1 app
//! sees HTTP/1.1 with the same headers and body). A request without the header (a client
//! outside the mesh) reaches the app in the protocol it came in. The app's connections are
//! pooled per port and made from 127.0.0.6 (`::6`), like opaque inbound connections.
//!
//! Before that, each request is authorized by the pod's policies in the current table
//! ([`crate::policy`]): a denied one gets 403 naming the policy (gRPC: `PERMISSION_DENIED`).

use super::body::{Held, RequestBody, ResponseBody};
use super::errors::{self, ProxyError};
use super::forward::{admit, fail, respond};
use super::headers::{self, ORIG_PROTO};
use super::log::RequestLog;
use super::upstream::{self, Hop, Proto};
use super::ConnCx;
use crate::endpoint::EndpointState;
use crate::policy::{Attrs, Decision};
use crate::table::InboundPort;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use std::sync::Arc;
use tracing::debug;

pub async fn request(
    cx: &ConnCx,
    port: Option<&Arc<InboundPort>>,
    local: &Arc<EndpointState>,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let (mut req, mut log) = match admit(cx, req) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let grpc = errors::is_grpc(req.headers());
    let proto = match req.headers_mut().remove(ORIG_PROTO) {
        Some(v) if v == Proto::Http1.as_str() => Proto::Http1,
        Some(v) if v == Proto::Http2.as_str() => Proto::Http2,
        _ => Proto::of(cx.version),
    };
    // The app's own connections: per port when a service sends here, else this
    // connection's.
    let (app, stats) = match port {
        Some(p) => {
            log.service = Some(p.service.clone());
            log.pod = Some(p.pod.clone());
            (&p.app, Some(p.stats.clone()))
        }
        None => (local, Some(cx.shared.inbound_stats.clone())),
    };
    log.stats = stats;
    // Authorization (`crate::policy`), per request with the current table, so a policy
    // change applies to the next request.
    if let Some(d) = authorize(cx, &req) {
        (log.authz, log.policy) = (d.label(), d.policy.clone());
        if !d.allowed() {
            return denied(log, &d, grpc);
        }
    }
    log.endpoint = Some(cx.dst);
    let hop = Hop {
        addr: cx.dst,
        source: Some(crate::inbound::source_for(cx.dst)),
        connect_timeout: cx.shared.connect_timeout,
        pool: &app.pool,
        metrics: &cx.shared.metrics,
        direction: cx.direction,
        // The app is local and plaintext.
        mesh: None,
        tls_cipher: None,
    };
    let upgrade = (cx.version != Version::HTTP_2 && headers::is_upgrade(req.headers()))
        .then(|| hyper::upgrade::on(&mut req));
    let in_flight = app.begin();
    let result = match upgrade.is_some() {
        true => match hop.upgrade_conn().await {
            Ok(conn) => {
                upstream::prepare(&mut req, Proto::Http1, &cx.authority);
                hop.upgrade(conn, req).await.map(|r| (r, None))
            }
            Err(e) => Err(e),
        },
        false => match hop.conn(proto).await {
            Ok(conn) => {
                upstream::prepare(&mut req, proto, &cx.authority);
                hop.send(conn, req).await
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok((resp, stream)) => {
            let held = Held {
                stream,
                in_flight: Some(in_flight),
                request: None,
            };
            respond(cx, resp, log, None, upgrade, held)
        }
        Err(e) => {
            debug!(app = %cx.dst, error = %e, "request to the app failed");
            let err = match e.before_sending() {
                true => ProxyError::ConnectFailed,
                false => ProxyError::UpstreamFailed,
            };
            fail(log, err, grpc)
        }
    }
}

/// The decision on one request by the current table's policies (`None`: no table yet).
fn authorize(cx: &ConnCx, req: &Request<RequestBody>) -> Option<Decision> {
    let table = cx.shared.table.load();
    let attrs = Attrs::http(
        cx.peer.as_deref(),
        cx.dst.port(),
        req.method().as_str(),
        req.uri().path(),
    );
    Some(table.as_ref()?.authz().authorize(&attrs))
}

/// The answer to a denied request: 403 naming the policy, finishing the log.
fn denied(mut log: Box<RequestLog>, d: &Decision, grpc: bool) -> Response<ResponseBody> {
    debug!(src = %log.src, path = %log.path, policy = d.policy.as_deref().unwrap_or(""), "request denied");
    let mut resp = errors::respond_denied(&d.message(), grpc);
    log.status = resp.status().as_u16();
    log.error = Some(ProxyError::Denied.reason());
    if grpc {
        log.grpc_status = Some(ProxyError::Denied.grpc_status());
    }
    resp.body_mut().set_log(log);
    resp
}
