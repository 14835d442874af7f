//! One request from the mesh (outbound) or from outside it (gateway) to a service: find the
//! rule, apply its filters, pick a backend by weight, apply the service's faults and
//! circuit-breaker limits, pick an endpoint by the service's balancer, send it there (again,
//! where that is safe and the route or the mesh says so), and give the answer back.
//!
//! Routing per request, not per connection: every request looks the destination up in the
//! current table, so one long-lived HTTP/2 or gRPC connection from an app is spread over
//! every replica and follows route and endpoint changes as they come.

use super::body::{BoxError, Held, Replay, RequestBody, ResponseBody};
use super::errors::{self, ProxyError};
use super::headers::{self, ORIG_PROTO};
use super::log::RequestLog;
use super::upstream::{self, Hop, Proto};
use super::ConnCx;
use crate::endpoint::{now_ns, BalancerState, Outcome, Slot};
use crate::route::filter::{self, Origin};
use crate::route::{Filter, HeaderModifier, Request as RouteRequest, RetryDef, RuleDef};
use crate::table::{Backends, Endpoint, RuleTarget, Target};
use http::header::{HeaderValue, HOST, LOCATION};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use muon_core::Protocol;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

/// At most this many endpoints are tried when connecting fails (nothing was sent yet).
const MAX_CONNECT_TRIES: usize = 3;
/// A mirrored request gets this long; its answer is never waited for by the client.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
/// Mirrored requests in flight at most, per proxy; past that, requests are not mirrored
/// (a slow mirror must not pile up copies).
pub const MAX_MIRRORS: usize = 256;

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
        authz: "",
        policy: None,
        sent: sent.clone(),
        bytes_received: 0,
        started: Instant::now(),
        stats: None,
        me: cx.shared.pod.clone(),
        // Inbound over mutual TLS: the peer and this sidecar (outbound: set when a request
        // goes to a meshed endpoint).
        identities: match &cx.peer {
            Some(peer) => crate::tls::Identities {
                src: Some(peer.id.clone()),
                dst: cx.shared.mesh.as_ref().and_then(|m| m.own_id()),
                version: peer.version,
                cipher: peer.cipher,
            },
            None => Default::default(),
        },
        metrics: Some(cx.shared.metrics.clone()),
    });
    let grpc = errors::is_grpc(&parts.headers);
    if headers::header_bytes(&parts.method, &parts.uri, &parts.headers)
        > cx.shared.http.max_header_bytes
    {
        return Err(Box::new(fail(log, ProxyError::HeadersTooLarge, grpc)));
    }
    log.request_id = headers::ensure_request_id(&mut parts.headers);
    if let Some(normal) = super::path::normalize(parts.uri.path()) {
        match normalized_uri(&parts.uri, &normal) {
            Some(uri) => parts.uri = uri,
            None => return Err(Box::new(fail(log, ProxyError::BadRequest, grpc))),
        }
    }
    let req = Request::from_parts(parts, RequestBody::incoming(body, sent));
    Ok((req, log))
}

/// `uri` with its path replaced (the query kept).
fn normalized_uri(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(pq.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The request's authority: the URI's (HTTP/2, absolute form) or the `Host` header.
fn authority<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// An authority's host (an IPv6 literal keeps its brackets) and port.
fn split_authority(a: &str) -> (&str, Option<u16>) {
    let end = match a.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(a.len(), |e| e + 2),
        None => a.rfind(':').unwrap_or(a.len()),
    };
    let (host, rest) = a.split_at(end);
    match rest.strip_prefix(':').map(str::parse::<u16>) {
        Some(Ok(port)) => (host, Some(port)),
        // `host:junk` has no port: it is all host.
        Some(Err(_)) if rest.len() > 1 && !a.starts_with('[') => (a, None),
        _ => (host, None),
    }
}

/// A host without its port, lowercase, for hostname matching.
fn host_of(authority: &str) -> Cow<'_, str> {
    let host = split_authority(authority).0;
    match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(host.to_ascii_lowercase()),
        false => Cow::Borrowed(host),
    }
}

fn default_port(scheme: &str) -> u16 {
    match scheme {
        "https" => 443,
        _ => 80,
    }
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
    let site = Site {
        scheme: "http",
        port: target.port,
    };
    match &target.router {
        None => forward(cx, req, log, None, &target.default, site).await,
        Some(router) => match router.find(&route_view(&req, None)) {
            Some(found) => forward(cx, req, log, Some(found.rule), found.target, site).await,
            None => {
                let grpc = errors::is_grpc(req.headers());
                log.stats = Some(target.default.stats.clone());
                fail(log, ProxyError::NoRoute, grpc)
            }
        },
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
    let name = cx.shared.gateway.clone().unwrap_or_else(|| Arc::from(""));
    let table = cx.shared.table.load_full();
    let router = table.as_ref().and_then(|t| t.gateway(&name)).cloned();
    log.service = Some(name);
    let Some(router) = router else {
        return fail(log, ProxyError::NoRoute, grpc);
    };
    let host = authority(req.uri(), req.headers()).map_or(Cow::Borrowed(""), host_of);
    let site = Site {
        scheme,
        port: cx.dst.port(),
    };
    match router.find(&route_view(&req, Some(&host))) {
        Some(found) => forward(cx, req, log, Some(found.rule), found.target, site).await,
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

/// Where a request came in, for redirects: the scheme, and the listener's port (the
/// service port for a sidecar).
#[derive(Clone, Copy)]
struct Site {
    scheme: &'static str,
    port: u16,
}

/// The `Location` a `RequestRedirect` sends the client to. An unchanged port is the one the
/// client used: the `Host`'s, or the scheme's default when the `Host` names none (behind a
/// port mapping the listener's own port means nothing to the client); the listener's only
/// when the request has no authority at all.
fn redirect_location(req: &Request<RequestBody>, r: &crate::route::Redirect, site: Site) -> String {
    let (host, port) = match authority(req.uri(), req.headers()) {
        Some(a) => {
            let (_, port) = split_authority(a);
            (
                host_of(a),
                port.unwrap_or_else(|| default_port(site.scheme)),
            )
        }
        None => (Cow::Borrowed(""), site.port),
    };
    filter::redirect_location(
        r,
        &Origin {
            scheme: site.scheme,
            host: &host,
            port,
            path: req.uri().path(),
            query: req.uri().query(),
        },
    )
}

/// Applies the rule to the request and sends it to one of the rule's backends.
async fn forward(
    cx: &ConnCx,
    mut req: Request<RequestBody>,
    mut log: Box<RequestLog>,
    rule: Option<&RuleDef>,
    target: &RuleTarget,
    site: Site,
) -> Response<ResponseBody> {
    log.route = Some(target.route.clone());
    log.stats = Some(target.stats.clone());
    let grpc = errors::is_grpc(req.headers());
    let mut response_headers: Option<&HeaderModifier> = None;
    let mut mirrors = target.mirrors.iter();
    for f in rule.map_or(&[][..], |r| r.filters.as_slice()) {
        match f {
            Filter::Redirect(r) => {
                let location = redirect_location(&req, r, site);
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
    let Some(picked) = target
        .pick(headers::random() % target.total_weight)
        .and_then(|b| b.backends.as_ref())
    else {
        return fail(log, ProxyError::NoBackend, grpc);
    };
    let deadline = match (
        rule.and_then(|r| r.timeout),
        rule.and_then(|r| r.backend_timeout),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let upgrade = (cx.version != Version::HTTP_2 && headers::is_upgrade(req.headers()))
        .then(|| hyper::upgrade::on(&mut req));
    let retry = rule.and_then(|r| r.retry.as_ref());
    let route = &target.route;
    let sent = async {
        let backends = known(&cx.shared, picked).await;
        log.service = Some(backends.service.clone());
        inject_faults(&backends, route).await?;
        let limits = &backends.traffic.limits;
        let Some(slot) = Slot::take(&backends.balancer, requests, limits.max_requests) else {
            backends.stats.overloaded.inc();
            return Err(ProxyError::Overloaded);
        };
        let (resp, mut held) = match upgrade.is_some() {
            true => send_upgrade(cx, &backends, req, &mut log).await?,
            false => send(cx, &backends, req, &mut log, retry).await?,
        };
        held.request = Some(slot);
        Ok((resp, held))
    };
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout)),
        None => sent.await,
    };
    match result {
        Ok((resp, held)) => respond(cx, resp, log, response_headers, upgrade, held),
        Err(e) => fail(log, e, grpc),
    }
}

/// `backends` once its endpoints are known: on demand, a backend a route names may never
/// have been subscribed to (only the services clients connect to are); it is subscribed
/// now, waited for (up to the connect timeout), and taken from the table that answer made.
async fn known(shared: &crate::Shared, backends: &Arc<Backends>) -> Arc<Backends> {
    let (false, Some(on_demand)) = (backends.known, &shared.on_demand) else {
        return backends.clone();
    };
    on_demand
        .wait(&backends.service, shared.connect_timeout)
        .await;
    let table = shared.table.load();
    table
        .as_ref()
        .and_then(|t| t.service(&backends.service))
        .and_then(|s| s.target(backends.port))
        .map_or_else(|| backends.clone(), |t| t.backends.clone())
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
/// dropped. At most [`MAX_MIRRORS`] copies are in flight.
fn mirror(cx: &ConnCx, req: &mut Request<RequestBody>, backends: Arc<Backends>) {
    let Some(slot) = MirrorSlot::take(&cx.shared) else {
        debug!(mirror = %backends.service, "too many mirrored requests in flight; not mirrored");
        return;
    };
    let body = match req.body().is_empty() {
        true => RequestBody::empty(),
        false => req.body_mut().tee(),
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    let cx = MirrorCx {
        shared: cx.shared.clone(),
        direction: cx.direction,
        src: cx.src,
        version: cx.version,
        authority: cx.authority.clone(),
    };
    tokio::spawn(async move {
        let _slot = slot;
        let sent = async {
            let backends = known(&cx.shared, &backends).await;
            let ep = pick_endpoint(&backends).ok_or("no endpoints")?;
            let hop = hop_to(&cx.shared, ep, cx.direction);
            let proto = hop_proto(ep.meshed, backends.protocol, cx.version);
            let conn = hop.conn(proto).await?;
            upstream::prepare(&mut copy, proto, &cx.authority);
            mark_orig_proto(&mut copy, ep.meshed, cx.version);
            let (resp, _stream) = hop.send(conn, copy).await?;
            let status = resp.status();
            // Read (and drop) the answer through, so its connection can serve again.
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<_, BoxError>((ep.addr, status))
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, sent).await {
            Ok(Ok((addr, status))) => {
                debug!(src = %cx.src, mirror = %addr, status = status.as_u16(), "mirrored")
            }
            Ok(Err(e)) => debug!(src = %cx.src, error = %e, "mirror failed"),
            Err(_) => debug!(src = %cx.src, "mirror timed out"),
        }
    });
}

/// What a mirrored request needs of its connection, owned (it outlives the request).
struct MirrorCx {
    shared: Arc<crate::Shared>,
    direction: crate::Direction,
    src: std::net::SocketAddr,
    version: Version,
    authority: Arc<str>,
}

/// One of the [`MAX_MIRRORS`] places for a mirrored request.
struct MirrorSlot(Arc<crate::Shared>);

impl MirrorSlot {
    fn take(shared: &Arc<crate::Shared>) -> Option<MirrorSlot> {
        let taken = shared
            .mirrors
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_MIRRORS).then_some(n + 1)
            });
        taken.ok().map(|_| MirrorSlot(shared.clone()))
    }
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.0.mirrors.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hop to one endpoint, on its pooled connections.
fn hop_to<'a>(shared: &'a crate::Shared, ep: &'a Endpoint, direction: crate::Direction) -> Hop<'a> {
    let mesh = shared
        .mesh
        .as_deref()
        .filter(|m| ep.meshed && !ep.identity.is_empty() && m.ready())
        .map(|m| (m, &*ep.identity));
    Hop {
        addr: ep.addr,
        source: None,
        connect_timeout: shared.connect_timeout,
        pool: &ep.state.pool,
        metrics: &shared.metrics,
        direction,
        mesh,
        tls_cipher: Some(&ep.state.tls_cipher),
    }
}

fn pick_endpoint(b: &Backends) -> Option<&Endpoint> {
    let i = b.pick(&crate::balance::Tried::default())?;
    b.endpoints.get(i)
}

/// What an answer says about the endpoint that gave it: a meshed endpoint's sidecar that
/// could not reach its app answered for it, and that is a connect failure.
fn outcome_of(resp: &Response<Incoming>) -> Outcome {
    let connect_failed = resp
        .headers()
        .get(errors::ERROR_HEADER)
        .is_some_and(|v| v.as_bytes() == ProxyError::ConnectFailed.reason().as_bytes());
    match connect_failed {
        true => Outcome::ConnectFailed,
        false => Outcome::Status(resp.status().as_u16()),
    }
}

/// The protocol of the hop to an endpoint: a meshed endpoint gets the mesh's HTTP/2; one
/// without a sidecar what its port declares (`http`: HTTP/1.1, `http2` and `grpc`:
/// HTTP/2), else the protocol the client spoke.
fn hop_proto(meshed: bool, declared: Option<Protocol>, client: Version) -> Proto {
    match (meshed, declared) {
        (true, _) => Proto::Http2,
        (false, Some(Protocol::Http)) => Proto::Http1,
        (false, Some(Protocol::Http2 | Protocol::Grpc)) => Proto::Http2,
        (false, _) => Proto::of(client),
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

fn requests(b: &BalancerState) -> &AtomicU32 {
    &b.requests
}

fn pending(b: &BalancerState) -> &AtomicU32 {
    &b.pending
}

/// The service's faults, where they apply to this request's route: a delay, then maybe an
/// abort (the proxy's answer, with the fault's status).
async fn inject_faults(backends: &Backends, route: &str) -> Result<(), ProxyError> {
    let Some(f) = &backends.traffic.faults else {
        return Ok(());
    };
    if !f.routes.is_empty() && !f.routes.iter().any(|r| r == route) {
        return Ok(());
    }
    if f.delay_percent > 0 && headers::random() % 100 < u64::from(f.delay_percent) {
        backends.stats.fault_delay.inc();
        tokio::time::sleep(f.delay).await;
    }
    if f.abort_percent > 0 && headers::random() % 100 < u64::from(f.abort_percent) {
        backends.stats.fault_abort.inc();
        return Err(ProxyError::FaultAbort(f.abort_status.as_u16()));
    }
    Ok(())
}

/// An upgrade (WebSocket and the like): HTTP/1.1 on a connection of its own, meshed or
/// not; the next endpoint when connecting fails, never retried once sent.
async fn send_upgrade(
    cx: &ConnCx,
    backends: &Backends,
    mut req: Request<RequestBody>,
    log: &mut RequestLog,
) -> Result<(Response<Incoming>, Held), ProxyError> {
    let mut tried = crate::balance::Tried::default();
    for _ in 0..MAX_CONNECT_TRIES.min(backends.endpoints.len()) {
        let Some(i) = backends.pick(&tried) else {
            break;
        };
        tried.add(i);
        let ep = &backends.endpoints[i];
        let hop = hop_to(&cx.shared, ep, cx.direction);
        log.endpoint = Some(ep.addr);
        log.pod = Some(ep.pod.clone());
        let conn = match hop.upgrade_conn().await {
            Ok(c) => c,
            Err(e) => {
                backends.record(i, Outcome::ConnectFailed);
                debug!(endpoint = %ep.addr, error = %e, "connect failed; trying the next endpoint");
                continue;
            }
        };
        upstream::prepare(&mut req, Proto::Http1, &cx.authority);
        req.headers_mut().remove(ORIG_PROTO);
        let in_flight = ep.state.begin();
        return match hop.upgrade(conn, req).await {
            Ok(resp) => Ok((
                resp,
                Held {
                    in_flight: Some(in_flight),
                    ..Held::default()
                },
            )),
            Err(e) => {
                debug!(endpoint = %ep.addr, error = %e, "upgrade request failed");
                Err(ProxyError::UpstreamFailed)
            }
        };
    }
    match backends.endpoints.is_empty() {
        true => Err(ProxyError::NoEndpoints),
        false => Err(ProxyError::ConnectFailed),
    }
}

/// What a request keeps to be sent again: its head and a replayable body.
struct Again {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
    body: Replay,
}

impl Again {
    fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(self.body.body());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Sends the request to an endpoint picked by the service's balancer, and tries again
/// where that is safe:
///
/// - connecting failed (nothing was sent): the next endpoint, up to [`MAX_CONNECT_TRIES`];
/// - a meshed endpoint's sidecar could not reach its app (the app never saw the request):
///   the next endpoint, as for a failed connect, when the body can be sent again;
/// - the answer's status is one the route's `retry` lists (gRPC `UNAVAILABLE` when it lists
///   503): up to `attempts` more tries, after a jittered, doubling backoff, while the
///   service's retry budget allows, when the body can be sent again (bodies are kept up to
///   `--retry-buffer-bytes`).
///
/// Each try goes to an endpoint this request has not tried, while one is left. The last
/// answer is the client's.
async fn send(
    cx: &ConnCx,
    backends: &Backends,
    req: Request<RequestBody>,
    log: &mut RequestLog,
    retry: Option<&RetryDef>,
) -> Result<(Response<Incoming>, Held), ProxyError> {
    if backends.endpoints.is_empty() {
        return Err(ProxyError::NoEndpoints);
    }
    let budget = &backends.traffic.budget;
    backends.balancer.budget.request(budget);
    // Only a request that may be sent again is kept: a retry route, or more than one
    // endpoint to go to when a sidecar answers for its unreachable app.
    let keep = retry.is_some_and(|r| r.attempts > 0) || backends.endpoints.len() > 1;
    let (mut req, again) = match keep {
        false => (req, None),
        true => {
            let (parts, body) = req.into_parts();
            let (body, replay) = body.replayable(cx.shared.retry_buffer_bytes);
            let again = Again {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
                body: replay,
            };
            (Request::from_parts(parts, body), Some(again))
        }
    };
    let mut tried = crate::balance::Tried::default();
    let (mut connect_failures, mut retries) = (0, 0u32);
    let mut answered_for_app = 0;
    loop {
        let Some(i) = backends.pick(&tried) else {
            return Err(ProxyError::NoEndpoints);
        };
        tried.add(i);
        let ep = &backends.endpoints[i];
        let hop = hop_to(&cx.shared, ep, cx.direction);
        log.endpoint = Some(ep.addr);
        log.pod = Some(ep.pod.clone());
        let proto = hop_proto(ep.meshed, backends.protocol, cx.version);
        let Some(waiting) = Slot::take(
            &backends.balancer,
            pending,
            backends.traffic.limits.max_pending_requests,
        ) else {
            backends.stats.overloaded.inc();
            return Err(ProxyError::Overloaded);
        };
        let started = now_ns();
        let conn = match hop.conn(proto).await {
            Ok(c) => c,
            Err(e) => {
                backends.record(i, Outcome::ConnectFailed);
                connect_failures += 1;
                debug!(endpoint = %ep.addr, error = %e, "connect failed; trying the next endpoint");
                if connect_failures >= MAX_CONNECT_TRIES.min(backends.endpoints.len()) {
                    return Err(ProxyError::ConnectFailed);
                }
                continue;
            }
        };
        // Connected (or pooled): the endpoint proved its identity, and the cipher of its
        // connections is known.
        if let Some((mesh, identity)) = hop.mesh {
            log.identities = crate::tls::Identities {
                src: mesh.own_id(),
                dst: Some(identity.into()),
                version: "TLSv1.3",
                cipher: ep.state.tls_cipher.get().copied().unwrap_or(""),
            };
        }
        upstream::prepare(&mut req, proto, &cx.authority);
        mark_orig_proto(&mut req, ep.meshed, cx.version);
        let in_flight = ep.state.begin();
        let sent = hop.send(conn, req).await;
        drop(waiting);
        let (resp, stream) = match sent {
            Ok(answer) => answer,
            Err(e) => {
                backends.record(i, Outcome::Failed);
                debug!(endpoint = %ep.addr, error = %e, "upstream request failed");
                if retries > 0 {
                    backends.stats.retry_failure.inc();
                }
                return Err(ProxyError::UpstreamFailed);
            }
        };
        ep.state.observe(now_ns() - started, &backends.balancer);
        let outcome = outcome_of(&resp);
        backends.record(i, outcome);
        let grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let status = resp.status().as_u16();
        // May this answer be tried again? A sidecar answering for its unreachable app is
        // tried again whatever the route says (like a failed connect); a status only as the
        // route says.
        let app_unreachable = outcome == Outcome::ConnectFailed
            && answered_for_app + 1 < MAX_CONNECT_TRIES.min(backends.endpoints.len());
        let listed = retry.is_some_and(|r| r.retries(status, grpc_status) && retries < r.attempts);
        let replay = again.as_ref().filter(|a| a.body.can_replay());
        let next = match replay.filter(|_| app_unreachable || listed) {
            None => None,
            Some(_) if !app_unreachable && !backends.balancer.budget.try_retry(budget) => {
                backends.stats.budget_exhausted.inc();
                debug!(service = %backends.service, "retry budget exhausted; not retried");
                None
            }
            Some(again) => Some(again),
        };
        let Some(again) = next else {
            if retries > 0 {
                let failed = outcome == Outcome::ConnectFailed
                    || status >= 500
                    || retry.is_some_and(|r| r.retries(status, grpc_status));
                match failed {
                    true => backends.stats.retry_failure.inc(),
                    false => backends.stats.retry_success.inc(),
                };
            }
            let held = Held {
                stream,
                in_flight: Some(in_flight),
                request: None,
            };
            return Ok((resp, held));
        };
        answered_for_app += usize::from(app_unreachable);
        retries += 1;
        backends.stats.retry.inc();
        debug!(endpoint = %ep.addr, status, retry = retries, "retrying on another endpoint");
        // This answer is done with: its body is dropped, its stream and count let go.
        drop((resp, stream, in_flight));
        if !app_unreachable {
            if let Some(r) = retry {
                tokio::time::sleep(backoff(r.backoff, retries)).await;
            }
        }
        req = again.request();
    }
}

/// The wait before retry `n` (1-based): `base × 2^(n-1)`, jittered to between half and
/// all of it, so that clients who failed together do not come back together.
fn backoff(base: Duration, n: u32) -> Duration {
    let full = base.saturating_mul(1 << (n - 1).min(10));
    let nanos = u64::try_from(full.as_nanos()).unwrap_or(u64::MAX);
    if nanos < 2 {
        return full;
    }
    Duration::from_nanos(nanos / 2 + headers::random() % (nanos / 2 + 1))
}

/// The upstream's answer on its way to the client: hop-by-hop headers out, response
/// filters applied; an upgrade's two sides joined.
pub(super) fn respond(
    cx: &ConnCx,
    mut resp: Response<Incoming>,
    mut log: Box<RequestLog>,
    filters: Option<&HeaderModifier>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    held: Held,
) -> Response<ResponseBody> {
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = upgrade {
            join_upgrade(cx, client, hyper::upgrade::on(&mut resp));
        }
    } else {
        headers::remove_hop_by_hop(resp.headers_mut());
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
    resp.map(|b| ResponseBody::upstream(b, Some(log), held))
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
        assert_eq!(split_authority("shop:8443"), ("shop", Some(8443)));
        assert_eq!(split_authority("shop"), ("shop", None));
        assert_eq!(split_authority("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_authority("shop:x"), ("shop:x", None));
    }

    fn get(uri: &str, host: Option<&str>) -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::empty());
        *r.uri_mut() = uri.parse().unwrap();
        if let Some(h) = host {
            r.headers_mut()
                .insert(HOST, HeaderValue::from_str(h).unwrap());
        }
        r
    }

    #[test]
    fn a_redirect_keeps_the_port_the_client_used() {
        let to_https = crate::route::Redirect {
            scheme: Some("https".into()),
            hostname: None,
            port: None,
            path: None,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        let same = crate::route::Redirect {
            scheme: None,
            ..to_https.clone()
        };
        let site = Site {
            scheme: "http",
            port: 8080,
        };
        // Behind a port mapping: the client's 18080, not the listener's 8080.
        let r = get("/a?b=1", Some("Shop.example:18080"));
        assert_eq!(
            redirect_location(&r, &same, site),
            "http://shop.example:18080/a?b=1"
        );
        assert_eq!(
            redirect_location(&r, &to_https, site),
            "https://shop.example/a?b=1"
        );
        // No port in Host: the client used the scheme's.
        let r = get("/", Some("shop.example"));
        assert_eq!(redirect_location(&r, &same, site), "http://shop.example/");
        // No authority at all: the listener's.
        let r = get("/", None);
        assert_eq!(redirect_location(&r, &same, site), "http://:8080/");
    }

    #[test]
    fn backoff_doubles_with_jitter_between_half_and_all() {
        let base = Duration::from_millis(20);
        for n in 1..=4u32 {
            let full = base * (1 << (n - 1));
            for _ in 0..50 {
                let b = backoff(base, n);
                assert!(b >= full / 2 && b <= full, "retry {n}: {b:?}");
            }
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
        // The doubling stops at 2^10.
        assert!(backoff(base, 30) <= base * 1024);
    }

    #[test]
    fn meshed_endpoints_get_http2_and_the_client_protocol_in_a_header() {
        assert_eq!(hop_proto(true, None, Version::HTTP_11), Proto::Http2);
        assert_eq!(
            hop_proto(true, Some(Protocol::Http), Version::HTTP_11),
            Proto::Http2
        );
        assert_eq!(hop_proto(false, None, Version::HTTP_11), Proto::Http1);
        assert_eq!(hop_proto(false, None, Version::HTTP_2), Proto::Http2);
        // Without a sidecar, the port's declaration wins over what the client spoke.
        assert_eq!(
            hop_proto(false, Some(Protocol::Http), Version::HTTP_2),
            Proto::Http1
        );
        assert_eq!(
            hop_proto(false, Some(Protocol::Grpc), Version::HTTP_11),
            Proto::Http2
        );
        let mut r = Request::new(());
        mark_orig_proto(&mut r, true, Version::HTTP_11);
        assert_eq!(r.headers()[ORIG_PROTO], "HTTP/1.1");
        mark_orig_proto(&mut r, false, Version::HTTP_11);
        assert!(!r.headers().contains_key(ORIG_PROTO));
    }
}
