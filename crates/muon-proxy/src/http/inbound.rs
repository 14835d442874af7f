//! One request arriving at this pod, to its app.
//!
//! A peer sidecar carries every request over its pooled HTTP/2 and says in
//! `x-muon-orig-proto` what its app spoke; the app here gets that protocol (an HTTP/1.1 app
//! sees HTTP/1.1 with the same headers and body). A request without the header (a client
//! outside the mesh) reaches the app in the protocol it came in. The app's connections are
//! pooled per port and made from 127.0.0.6 (`::6`), like opaque inbound connections.

use super::body::{Held, ResponseBody};
use super::errors::{self, ProxyError};
use super::forward::{admit, fail, respond};
use super::headers::{self, ORIG_PROTO};
use super::upstream::{self, Hop, Proto};
use super::ConnCx;
use crate::endpoint::EndpointState;
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
    log.endpoint = Some(cx.dst);
    let hop = Hop {
        addr: cx.dst,
        source: Some(crate::inbound::source_for(cx.dst)),
        connect_timeout: cx.shared.connect_timeout,
        pool: &app.pool,
        metrics: &cx.shared.metrics,
        direction: cx.direction,
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
