//! The one small HTTP/1.1 server Muon's processes run beside their real work: the proxy's
//! health and admin ports, the control plane's metrics port. Plain answers (a body in one
//! piece), at most [`MAX_CONNECTIONS`] connections at once (more are closed on accept), a
//! client that does not send its request head within hyper's header timeout is cut. It
//! serves until the future is dropped.
#![forbid(unsafe_code)]

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Concurrent connections per server; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// The Prometheus/OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `handler` on `listener` until dropped (its connections go with it). `name` is
/// for logs.
pub async fn serve<H, F>(listener: TcpListener, name: &'static str, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    match listener.local_addr() {
        Ok(addr) => info!(server = name, %addr, "listening"),
        Err(_) => info!(server = name, "listening"),
    }
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(server = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    debug!(server = name, "too many HTTP connections; closing");
                    continue;
                }
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let answer = handler(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        debug!(server = name, error = %e, "HTTP connection ended");
                    }
                });
            }
        }
    }
}

/// An answer with a body of `content_type`.
pub fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_what_the_handler_says_and_stops_when_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            "test",
            |req: Request<Incoming>| async move {
                match (req.method(), req.uri().path()) {
                    (&Method::GET, "/hello") => text(StatusCode::OK, "hello\n"),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            },
        ));
        let within = Duration::from_secs(10);
        let hello = tokio::time::timeout(within, get(addr, "/hello"))
            .await
            .unwrap();
        assert!(
            hello.starts_with("HTTP/1.1 200") && hello.ends_with("hello\n"),
            "{hello}"
        );
        assert!(hello.contains("content-type: text/plain"), "{hello}");
        let missing = tokio::time::timeout(within, get(addr, "/nope"))
            .await
            .unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
        let _ = server.await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening"
        );
    }
}
