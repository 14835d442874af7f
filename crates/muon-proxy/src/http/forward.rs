//! One request from the mesh (outbound) or from outside it (gateway) to a service: find the
//! rule, apply its filters, pick a backend by weight and an endpoint by round robin, send
//! it there, and give the answer back.
//!
//! Routing per request, not per connection: every request looks the destination up in the
//! current table, so one long-lived HTTP/2 or gRPC connection from an app is spread over
//! every replica and follows route and endpoint changes as they come.

use super::body::{RequestBody, ResponseBody};
use super::errors::{self, ProxyError};
use super::headers::{self, ORIG_PROTO};
use super::log::RequestLog;
use super::upstream::{self, Hop, Proto};
use super::ConnCx;
use crate::route::filter::{self, Origin};
use crate::route::{Filter, HeaderModifier, Request as RouteRequest, RuleDef};
use crate::table::{Backends, RuleTarget, Target};
use http::header::{HeaderValue, HOST, LOCATION};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

/// At most this many endpoints are tried when connecting fails (nothing was sent yet).
const MAX_CONNECT_TRIES: usize = 3;
/// A mirrored request gets this long; its answer is never waited for by the client.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// A request admitted: on its way upstream, with its log.
pub(super) type Admitted = (Request<RequestBody>, Box<RequestLog>);

/// The start of every request: the log, the header-size limit, the request id. `Err` is the
/// proxy's answer.
pub(super) fn admit(
    cx: &ConnCx,
    req: Request<Incoming>,
) -> Result<Admitted, Box<Response<ResponseBody>>> {
    let (mut parts, body) = req.into_parts();
    let sent = Arc::new(AtomicU64::new(0));
    let mut log = Box::new(RequestLog {
        direction: cx.direction,
        src: cx.src,
        dst: cx.dst,
        protocol: Proto::of(cx.version).as_str(),
        method: parts.method.clone(),
        authority: authority(&parts.uri, &parts.headers)
            .unwrap_or_default()
            .to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        request_id: String::new(),
        service: None,
        route: None,
        endpoint: None,
        pod: None,
        status: 0,
        grpc_status: None,
        error: None,
        sent: sent.clone(),
        bytes_received: 0,
        started: Instant::now(),
        stats: None,
        me: cx.shared.pod.clone(),
    });
    let grpc = errors::is_grpc(&parts.headers);
    if headers::header_bytes(&parts.method, &parts.uri, &parts.headers)
        > cx.shared.http.max_header_bytes
    {
        return Err(Box::new(fail(log, ProxyError::HeadersTooLarge, grpc)));
    }
    log.request_id = headers::ensure_request_id(&mut parts.headers);
    let req = Request::from_parts(parts, RequestBody::incoming(body, sent));
    Ok((req, log))
}

/// The request's authority: the URI's (HTTP/2, absolute form) or the `Host` header.
fn authority<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// A host without its port, lowercase, for hostname matching.
fn host_of(authority: &str) -> String {
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        Some(rest) => rest
            .find(']')
            .map_or(authority, |end| &authority[..end + 2]),
        None => match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        },
    };
    host.to_ascii_lowercase()
}

/// The proxy's own answer, finishing the log.
pub(super) fn fail(
    mut log: Box<RequestLog>,
    err: ProxyError,
    grpc: bool,
) -> Response<ResponseBody> {
    let mut resp = errors::respond(err, grpc);
    log.status = resp.status().as_u16();
    log.error = Some(err.reason());
    if grpc {
        log.grpc_status = Some(err.grpc_status());
    }
    resp.body_mut().set_log(log);
    resp
}

/// Outbound: to the service port the connection was for (looked up again, so changes apply
/// to open connections), by its routes or straight to it.
pub async fn outbound(
    cx: &ConnCx,
    planned: &Arc<Target>,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let (req, mut log) = match admit(cx, req) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let table = cx.shared.table.load_full();
    let target = table
        .as_ref()
        .and_then(|t| t.lookup(cx.dst))
        .unwrap_or(planned)
        .clone();
    log.service = Some(target.service.clone());
    let origin = OriginParts::of(&req, "http", target.port);
    match &target.router {
        None => forward(cx, req, log, None, &target.default, &origin).await,
        Some(router) => {
            let view = route_view(&req, None);
            match router.find(&view) {
                Some(found) => forward(cx, req, log, Some(found.rule), found.target, &origin).await,
                None => {
                    let grpc = errors::is_grpc(req.headers());
                    log.stats = Some(target.default.stats.clone());
                    fail(log, ProxyError::NoRoute, grpc)
                }
            }
        }
    }
}

/// Gateway: by the routes attached to this gateway, matched on the request's host too.
pub async fn gateway(
    cx: &ConnCx,
    scheme: &'static str,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let (req, mut log) = match admit(cx, req) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let grpc = errors::is_grpc(req.headers());
    let name = cx.shared.gateway.as_deref().unwrap_or_default();
    log.service = Some(Arc::from(name));
    let table = cx.shared.table.load_full();
    let Some(router) = table.as_ref().and_then(|t| t.gateway(name)).cloned() else {
        return fail(log, ProxyError::NoRoute, grpc);
    };
    let host = authority(req.uri(), req.headers()).map(host_of);
    let origin = OriginParts::of(&req, scheme, cx.dst.port());
    let view = route_view(&req, Some(host.as_deref().unwrap_or("")));
    match router.find(&view) {
        Some(found) => forward(cx, req, log, Some(found.rule), found.target, &origin).await,
        None => fail(log, ProxyError::NoRoute, grpc),
    }
}

fn route_view<'a>(req: &'a Request<RequestBody>, host: Option<&'a str>) -> RouteRequest<'a> {
    RouteRequest {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        host,
    }
}

/// What a redirect needs of the original request (owned: the request moves on).
struct OriginParts {
    scheme: &'static str,
    host: String,
    port: u16,
}

impl OriginParts {
    fn of(req: &Request<RequestBody>, scheme: &'static str, port: u16) -> OriginParts {
        OriginParts {
            scheme,
            host: authority(req.uri(), req.headers())
                .map(host_of)
                .unwrap_or_default(),
            port,
        }
    }
}

/// Applies the rule to the request and sends it to one of the rule's backends.
async fn forward(
    cx: &ConnCx,
    mut req: Request<RequestBody>,
    mut log: Box<RequestLog>,
    rule: Option<&RuleDef>,
    target: &RuleTarget,
    origin: &OriginParts,
) -> Response<ResponseBody> {
    log.route = Some(target.route.clone());
    log.stats = Some(target.stats.clone());
    let grpc = errors::is_grpc(req.headers());
    let mut response_headers: Option<&HeaderModifier> = None;
    let mut mirrors = target.mirrors.iter();
    for f in rule.map_or(&[][..], |r| r.filters.as_slice()) {
        match f {
            Filter::Redirect(r) => {
                let location = filter::redirect_location(
                    r,
                    &Origin {
                        scheme: origin.scheme,
                        host: &origin.host,
                        port: origin.port,
                        path: req.uri().path(),
                        query: req.uri().query(),
                    },
                );
                return redirect(log, r.status, &location);
            }
            Filter::RequestHeaders(m) => filter::modify_headers(m, req.headers_mut()),
            Filter::ResponseHeaders(m) => response_headers = Some(m),
            Filter::Rewrite(rw) => rewrite(&mut req, rw),
            Filter::Mirror(m) => {
                let backends = mirrors.next().and_then(Option::as_ref);
                let roll = headers::random() % u64::from(m.denominator.max(1));
                if let (Some(b), true) = (backends, roll < u64::from(m.numerator)) {
                    mirror(cx, &mut req, b.clone());
                }
            }
        }
    }
    if target.total_weight == 0 {
        return fail(log, ProxyError::NoBackend, grpc);
    }
    let Some(backends) = target
        .pick(headers::random() % target.total_weight)
        .and_then(|b| b.backends.as_ref())
    else {
        return fail(log, ProxyError::NoBackend, grpc);
    };
    log.service = Some(backends.service.clone());
    let deadline = match (
        rule.and_then(|r| r.timeout),
        rule.and_then(|r| r.backend_timeout),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let upgrade = (cx.version != Version::HTTP_2 && headers::is_upgrade(req.headers()))
        .then(|| hyper::upgrade::on(&mut req));
    let sent = send(cx, backends, req, &mut log, upgrade.is_some());
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout)),
        None => sent.await,
    };
    match result {
        Ok(resp) => respond(cx, resp, log, response_headers, upgrade),
        Err(e) => fail(log, e, grpc),
    }
}

fn redirect(
    mut log: Box<RequestLog>,
    status: StatusCode,
    location: &str,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Default::default(), None));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    log.status = status.as_u16();
    resp.body_mut().set_log(log);
    resp
}

fn rewrite(req: &mut Request<RequestBody>, rw: &crate::route::Rewrite) {
    let path = rw
        .path
        .as_ref()
        .map(|m| filter::rewrite_path(m, req.uri().path()));
    let host = rw.hostname.clone();
    if path.is_none() && host.is_none() {
        return;
    }
    let mut parts = req.uri().clone().into_parts();
    if let Some(p) = path {
        let pq = match req.uri().query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(h) = host {
        if parts.authority.is_some() {
            if let Ok(a) = h.to_str().unwrap_or_default().parse() {
                parts.authority = Some(a);
            }
        }
        req.headers_mut().insert(HOST, h);
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Sends a copy of the request to a mirror backend, without waiting for it: the copy's
/// body follows the original's (and is cut if the mirror falls behind); its answer is
/// dropped.
fn mirror(cx: &ConnCx, req: &mut Request<RequestBody>, backends: Arc<Backends>) {
    let body = match req.body().is_empty() {
        true => RequestBody::empty(),
        false => req.body_mut().tee(),
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    let shared = cx.shared.clone();
    let version = cx.version;
    let (direction, src, dst) = (cx.direction, cx.src, cx.dst);
    tokio::spawn(async move {
        let Some(ep) = pick_endpoint(&backends) else {
            return;
        };
        let hop = Hop {
            addr: ep.addr,
            source: None,
            connect_timeout: shared.connect_timeout,
            pool: &ep.state.pool,
            metrics: &shared.metrics,
            direction,
        };
        let proto = hop_proto(ep.meshed, version);
        let sent = async {
            let conn = hop.conn(proto).await?;
            let authority = dst.to_string();
            upstream::prepare(&mut copy, proto, &authority);
            mark_orig_proto(&mut copy, ep.meshed, version);
            hop.send(conn, copy).await
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, sent).await {
            Ok(Ok(resp)) => {
                debug!(%src, mirror = %ep.addr, status = resp.status().as_u16(), "mirrored")
            }
            Ok(Err(e)) => debug!(%src, mirror = %ep.addr, error = %e, "mirror failed"),
            Err(_) => debug!(%src, mirror = %ep.addr, "mirror timed out"),
        }
    });
}

fn pick_endpoint(b: &Backends) -> Option<&crate::table::Endpoint> {
    let i = b.balancer.rr.order(b.endpoints.len()).next()?;
    b.endpoints.get(i)
}

/// The protocol of the hop to an endpoint: a meshed endpoint gets the mesh's HTTP/2, one
/// without a sidecar the app's own protocol.
fn hop_proto(meshed: bool, client: Version) -> Proto {
    match meshed {
        true => Proto::Http2,
        false => Proto::of(client),
    }
}

/// A meshed endpoint's sidecar learns from `x-muon-orig-proto` what to give its app; no
/// one else gets the header.
fn mark_orig_proto<B>(req: &mut Request<B>, meshed: bool, client: Version) {
    match meshed {
        true => {
            req.headers_mut().insert(
                ORIG_PROTO,
                HeaderValue::from_static(Proto::of(client).as_str()),
            );
        }
        false => {
            req.headers_mut().remove(ORIG_PROTO);
        }
    }
}

/// Picks an endpoint (round robin; the next one when connecting fails) and sends.
async fn send(
    cx: &ConnCx,
    backends: &Backends,
    mut req: Request<RequestBody>,
    log: &mut RequestLog,
    upgrade: bool,
) -> Result<Response<Incoming>, ProxyError> {
    if backends.endpoints.is_empty() {
        return Err(ProxyError::NoEndpoints);
    }
    let authority = cx.dst.to_string();
    let order = backends.balancer.rr.order(backends.endpoints.len());
    for i in order.take(MAX_CONNECT_TRIES) {
        let ep = &backends.endpoints[i];
        let hop = Hop {
            addr: ep.addr,
            source: None,
            connect_timeout: cx.shared.connect_timeout,
            pool: &ep.state.pool,
            metrics: &cx.shared.metrics,
            direction: cx.direction,
        };
        log.endpoint = Some(ep.addr);
        log.pod = Some(ep.pod.clone());
        if upgrade {
            // Upgrades travel as HTTP/1.1 on a connection of their own, meshed or not.
            upstream::prepare(&mut req, Proto::Http1, &authority);
            req.headers_mut().remove(ORIG_PROTO);
            return hop.upgrade(req).await.map_err(|e| {
                debug!(error = %e, "upgrade request failed");
                match e.before_sending() {
                    true => ProxyError::ConnectFailed,
                    false => ProxyError::UpstreamFailed,
                }
            });
        }
        let proto = hop_proto(ep.meshed, cx.version);
        let conn = match hop.conn(proto).await {
            Ok(c) => c,
            Err(e) => {
                debug!(endpoint = %ep.addr, error = %e, "connect failed; trying the next endpoint");
                continue;
            }
        };
        upstream::prepare(&mut req, proto, &authority);
        mark_orig_proto(&mut req, ep.meshed, cx.version);
        ep.state.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = hop.send(conn, req).await;
        ep.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        return r.map_err(|e| {
            debug!(endpoint = %ep.addr, error = %e, "upstream request failed");
            ProxyError::UpstreamFailed
        });
    }
    Err(ProxyError::ConnectFailed)
}

/// The upstream's answer on its way to the client: hop-by-hop headers out, response
/// filters applied; an upgrade's two sides joined.
pub(super) fn respond(
    cx: &ConnCx,
    mut resp: Response<Incoming>,
    mut log: Box<RequestLog>,
    filters: Option<&HeaderModifier>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = upgrade {
            join_upgrade(cx, client, hyper::upgrade::on(&mut resp));
        }
    } else {
        headers::remove_hop_by_hop(resp.headers_mut(), cx.version);
        resp.headers_mut().remove(ORIG_PROTO);
    }
    if let Some(m) = filters {
        filter::modify_headers(m, resp.headers_mut());
    }
    *resp.version_mut() = match cx.version {
        Version::HTTP_2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    log.status = status.as_u16();
    log.grpc_status_from(resp.headers());
    resp.map(|b| ResponseBody::upstream(b, Some(log)))
}

/// Copies bytes between the client's and the upstream's upgraded connections until both
/// are done; the connection's task waits for it.
fn join_upgrade(
    cx: &ConnCx,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let idle = cx.shared.idle_timeout;
    let (direction, src, dst) = (cx.direction, cx.src, cx.dst);
    let task = tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut rec = crate::accesslog::Record::new(direction, src, dst);
        let mut c = hyper_util::rt::TokioIo::new(client);
        let mut u = hyper_util::rt::TokioIo::new(upstream);
        let outcome = crate::tcp::relay(&mut c, &mut u, idle, None, &mut rec).await;
        debug!(
            outcome = outcome.as_str(),
            sent = rec.bytes_sent,
            received = rec.bytes_received,
            "upgraded connection closed"
        );
    });
    cx.adopt_upgrade(task);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(host_of("Shop.Example:8080"), "shop.example");
        assert_eq!(host_of("shop.example"), "shop.example");
        assert_eq!(host_of("[2001:db8::1]:80"), "[2001:db8::1]");
        assert_eq!(host_of("[2001:db8::1]"), "[2001:db8::1]");
    }

    #[test]
    fn meshed_endpoints_get_http2_and_the_client_protocol_in_a_header() {
        assert_eq!(hop_proto(true, Version::HTTP_11), Proto::Http2);
        assert_eq!(hop_proto(false, Version::HTTP_11), Proto::Http1);
        assert_eq!(hop_proto(false, Version::HTTP_2), Proto::Http2);
        let mut r = Request::new(());
        mark_orig_proto(&mut r, true, Version::HTTP_11);
        assert_eq!(r.headers()[ORIG_PROTO], "HTTP/1.1");
        mark_orig_proto(&mut r, false, Version::HTTP_11);
        assert!(!r.headers().contains_key(ORIG_PROTO));
    }
}
