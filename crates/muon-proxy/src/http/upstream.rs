//! The client side: connections to upstreams (pooled, see [`super::pool`]) and the
//! request sent on them, in the protocol the hop needs, plus HTTP/1.1 upgrades.
//!
//! A request is turned into the next hop's form here and only here: HTTP/2 wants an absolute
//! URI (its `:authority`) and no `Host`, HTTP/1.1 an origin-form URI and a `Host`;
//! hop-by-hop headers never cross.

use super::body::RequestBody;
use super::headers;
use super::pool::{Pool, StreamGuard, Unavailable, H1, H2};
use crate::metrics::Metrics;
use crate::tcp::{self, ConnectError};
use crate::Direction;
use http::header::{HeaderValue, COOKIE, HOST};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::time::Duration;
use tracing::debug;

/// HTTP/2 pings on idle connections (pooled upstream ones, and clients'), so a peer that
/// vanished is noticed.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(30);
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol of one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

impl Proto {
    pub fn version(self) -> Version {
        match self {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        }
    }

    pub fn of(v: Version) -> Proto {
        match v {
            Version::HTTP_2 => Proto::Http2,
            _ => Proto::Http1,
        }
    }

    /// As `x-muon-orig-proto` carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::Http2 => "http2",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("mutual TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: crate::tls::TlsError,
    },
    #[error("connecting to {addr} failed for a request sent at the same time")]
    FailedMeanwhile { addr: SocketAddr },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Nothing was sent: another endpoint may be tried.
    pub fn before_sending(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::Handshake { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::FailedMeanwhile { .. }
        )
    }
}

/// Where and how to reach one upstream.
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    pub addr: SocketAddr,
    /// Bind this source first (inbound: 127.0.0.6 / ::6).
    pub source: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub pool: &'a Pool,
    pub metrics: &'a Metrics,
    pub direction: Direction,
    /// Mutual TLS to a meshed endpoint: this sidecar's TLS and the identity the endpoint
    /// must present (pooled HTTP/2 only).
    pub mesh: Option<(&'a crate::tls::MeshTls, &'a str)>,
    /// Where the negotiated cipher suite is noted.
    pub tls_cipher: Option<&'a std::sync::OnceLock<&'static str>>,
}

/// A connection ready for one request (HTTP/2: with the stream counted on it).
pub enum Conn {
    Http1(H1),
    Http2(H2, StreamGuard),
}

impl Hop<'_> {
    async fn tcp(&self) -> Result<tokio::net::TcpStream, ConnectError> {
        connect_with_source(self.addr, self.source, self.connect_timeout).await
    }

    /// A pooled connection in `proto`, connecting one when needed.
    pub async fn conn(&self, proto: Proto) -> Result<Conn, UpstreamError> {
        match proto {
            Proto::Http2 => match self.pool.h2(|| self.connect_h2()).await {
                Ok((s, guard)) => Ok(Conn::Http2(s, guard)),
                Err(Unavailable::Connect(e)) => Err(e),
                Err(Unavailable::FailedMeanwhile) => {
                    Err(UpstreamError::FailedMeanwhile { addr: self.addr })
                }
            },
            Proto::Http1 => match self.pool.take_h1() {
                Some(s) => Ok(Conn::Http1(s)),
                None => Ok(Conn::Http1(self.connect_h1(false).await?)),
            },
        }
    }

    async fn connect_h2(&self) -> Result<H2, UpstreamError> {
        let tcp = self.tcp().await?;
        match self.mesh {
            Some((mesh, identity)) => {
                let tls = mesh
                    .connect(tcp, self.addr.ip(), identity, crate::tls::Inner::Http2)
                    .await
                    .map_err(|e| {
                        self.metrics.tls(self.direction, e.reason());
                        UpstreamError::Tls {
                            addr: self.addr,
                            source: e,
                        }
                    })?;
                self.metrics.tls(self.direction, "ok");
                if let Some(cell) = self.tls_cipher {
                    let _ = cell.set(crate::tls::negotiated(tls.get_ref().1).1);
                }
                self.handshake_h2(TokioIo::new(tls)).await
            }
            None => self.handshake_h2(TokioIo::new(tcp)).await,
        }
    }

    async fn handshake_h2<I>(&self, io: I) -> Result<H2, UpstreamError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: self.addr,
                source,
            })?;
        self.count(Proto::Http2);
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(send)
    }

    async fn connect_h1(&self, upgrades: bool) -> Result<H1, UpstreamError> {
        let io = TokioIo::new(self.tcp().await?);
        let (mut send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: self.addr,
                source,
            })?;
        self.count(Proto::Http1);
        let addr = self.addr;
        tokio::spawn(async move {
            let done = match upgrades {
                true => conn.with_upgrades().await,
                false => conn.await,
            };
            if let Err(e) = done {
                debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        send.ready()
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        Ok(send)
    }

    fn count(&self, proto: Proto) {
        self.metrics
            .upstream_connections(self.direction, proto.label())
            .inc();
    }

    /// Sends `req` on `conn` (already in the hop's form, see [`prepare`]). An HTTP/1.1
    /// connection goes back to the pool once the request is sent; an HTTP/2 stream stays
    /// counted on its connection for as long as the returned guard lives (the response's).
    /// A connection that goes away (closed, or GOAWAY) before the request went out is
    /// replaced by a fresh one, once.
    pub async fn send(
        &self,
        conn: Conn,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<StreamGuard>), UpstreamError> {
        let addr = self.addr;
        let err = |source| UpstreamError::Request { addr, source };
        match conn {
            Conn::Http2(mut s, guard) => match s.try_send_request(req).await {
                Ok(resp) => Ok((resp, Some(guard))),
                Err(mut e) => match e.take_message() {
                    Some(req) => {
                        drop(guard);
                        let (mut fresh, guard) = self.pool.add_h2(self.connect_h2().await?);
                        let resp = fresh.send_request(req).await.map_err(err)?;
                        Ok((resp, Some(guard)))
                    }
                    None => Err(err(e.into_error())),
                },
            },
            Conn::Http1(mut s) => {
                let sent = s.try_send_request(req).await;
                match sent {
                    Ok(resp) => {
                        self.pool.put_h1(s);
                        Ok((resp, None))
                    }
                    // The pooled connection closed just before it was used and the request
                    // was not sent: once more on a fresh connection.
                    Err(mut e) => match e.take_message() {
                        Some(req) => {
                            let mut fresh = self.connect_h1(false).await?;
                            let resp = fresh.send_request(req).await.map_err(err)?;
                            self.pool.put_h1(fresh);
                            Ok((resp, None))
                        }
                        None => Err(err(e.into_error())),
                    },
                }
            }
        }
    }

    /// A connection for an HTTP/1.1 upgrade (WebSocket): its own, never pooled.
    pub async fn upgrade_conn(&self) -> Result<H1, UpstreamError> {
        self.connect_h1(true).await
    }

    /// Sends an upgrade request on its connection (from [`Hop::upgrade_conn`]).
    pub async fn upgrade(
        &self,
        mut conn: H1,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        conn.send_request(req)
            .await
            .map_err(|source| UpstreamError::Request {
                addr: self.addr,
                source,
            })
    }
}

/// Connects from `source` when given; an unavailable IPv6 source (no `::6` on `lo`: the
/// inbound source muon-init adds) falls back to the kernel's choice, with one warning.
pub async fn connect_with_source(
    addr: SocketAddr,
    source: Option<SocketAddr>,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, ConnectError> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match tcp::connect(addr, source, timeout).await {
        Err(ConnectError::Bind {
            addr: from,
            source: e,
        }) if addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(%from, "inbound IPv6 source unavailable (is muon-init's ::6 on lo?); connecting without it");
            }
            tcp::connect(addr, None, timeout).await
        }
        other => other,
    }
}

/// Puts `req` in the form of a hop in `proto`: version, URI form, `Host`, hop-by-hop
/// headers; `authority` is used when the request names none.
pub fn prepare(req: &mut Request<RequestBody>, proto: Proto, authority: &str) {
    let keep_upgrade = proto == Proto::Http1 && headers::is_upgrade(req.headers());
    let upgrade = keep_upgrade.then(|| {
        (
            req.headers().get(http::header::CONNECTION).cloned(),
            req.headers().get(http::header::UPGRADE).cloned(),
        )
    });
    headers::remove_hop_by_hop(req.headers_mut());
    // The proxy answered the client's `Expect: 100-continue` itself.
    req.headers_mut().remove(http::header::EXPECT);
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| authority.to_owned());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match proto {
        Proto::Http2 => {
            let scheme = req.uri().scheme_str().unwrap_or("http").to_owned();
            if let Ok(uri) = Uri::builder()
                .scheme(scheme.as_str())
                .authority(host.as_str())
                .path_and_query(path.as_str())
                .build()
            {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(HOST);
        }
        Proto::Http1 => {
            if let Ok(uri) = path.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            // The authority the request was routed by (an HTTP/2 `:authority` wins over a
            // `Host` sent alongside it, RFC 9113 §8.3.1).
            if let Ok(v) = HeaderValue::from_str(&host) {
                req.headers_mut().insert(HOST, v);
            }
            join_cookies(req.headers_mut());
        }
    }
    *req.version_mut() = proto.version();
    if let Some((connection, upgrade)) = upgrade {
        let h = req.headers_mut();
        if let Some(c) = connection {
            h.insert(http::header::CONNECTION, c);
        }
        if let Some(u) = upgrade {
            h.insert(http::header::UPGRADE, u);
        }
    }
}

/// HTTP/2 may split `Cookie` into one field per cookie (RFC 9113 §8.2.3); HTTP/1.1 wants
/// one, joined with `; `.
fn join_cookies(h: &mut http::HeaderMap) {
    let mut all = h.get_all(COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = h.get_all(COOKIE).iter().map(|v| v.as_bytes()).collect();
    let joined = joined.join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, version: Version) -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::empty());
        *r.uri_mut() = uri.parse().unwrap();
        *r.version_mut() = version;
        r
    }

    #[test]
    fn http1_requests_become_absolute_for_http2_and_back() {
        let mut r = req("/stock/widget?n=1", Version::HTTP_11);
        r.headers_mut()
            .insert(HOST, HeaderValue::from_static("inventory:8080"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        r.headers_mut()
            .insert("expect", HeaderValue::from_static("100-continue"));
        prepare(&mut r, Proto::Http2, "198.19.0.1:8080");
        assert_eq!(
            r.uri().to_string(),
            "http://inventory:8080/stock/widget?n=1"
        );
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(!r.headers().contains_key(HOST));
        assert!(!r.headers().contains_key("connection"));
        assert!(!r.headers().contains_key("expect"));

        r.headers_mut()
            .append(COOKIE, HeaderValue::from_static("a=1"));
        r.headers_mut()
            .append(COOKIE, HeaderValue::from_static("b=2"));
        r.headers_mut()
            .insert(HOST, HeaderValue::from_static("stale:1"));
        prepare(&mut r, Proto::Http1, "198.18.0.2:8080");
        assert_eq!(r.uri().to_string(), "/stock/widget?n=1");
        assert_eq!(r.headers()[HOST], "inventory:8080");
        assert_eq!(r.version(), Version::HTTP_11);
        let cookies: Vec<_> = r.headers().get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);

        // No Host at all (HTTP/1.0): the destination names it.
        let mut r = req("/", Version::HTTP_10);
        prepare(&mut r, Proto::Http2, "198.19.0.1:8080");
        assert_eq!(r.uri().to_string(), "http://198.19.0.1:8080/");
    }

    #[test]
    fn an_upgrade_keeps_its_connection_and_upgrade_headers() {
        let mut r = req("/ws", Version::HTTP_11);
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("Upgrade"));
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert("host", HeaderValue::from_static("chat"));
        prepare(&mut r, Proto::Http1, "chat:80");
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "Upgrade");
    }
}
