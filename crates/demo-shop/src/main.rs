//! The demo shop: the example application the demo, the tests and the benchmarks run in the lab.
//!
//! - `demo-shop inventory` answers `GET /stock/<item>` with the stock and the pod that answered;
//! - `demo-shop orders` answers `GET /orders/<item>` by asking inventory over HTTP/1.1 JSON;
//! - `demo-shop echo` answers every request with a fixed-size body (for benchmarks);
//! - `demo-shop echo-grpc` answers every request (a gRPC unary call, whatever the method) with
//!   one gRPC-framed message of a fixed size and the trailer `grpc-status: 0` (for benchmarks);
//! - `demo-shop reflect` answers with what it received (method, path, protocol, headers,
//!   body size) as JSON; `/delay/<ms>` answers after a pause, `/status/<code>` with that
//!   status (for the tests).
//!
//! `--delay-ms N` holds every answer N milliseconds before sending it, or only a fraction of
//! them with `--delay-rate F` (0..1, default 1): a slow replica, for the benchmarks' gray
//! failure. `echo` answers carry `x-pod: <POD_NAME>`, so a load generator can tell replicas
//! apart without reading bodies.
//!
//! Every app serves HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
//!
//! The apps know nothing of the mesh: they call `http://inventory:8080` by name, and the
//! sidecars do the rest. Every answer names the pod (from `POD_NAME`) so that a caller can see
//! where the mesh sent it.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone)]
enum App {
    Inventory,
    Orders {
        inventory: Arc<str>,
        version: Arc<str>,
    },
    Echo {
        body: Bytes,
    },
    /// The whole answer's body: the 5-byte gRPC prefix and the message.
    EchoGrpc {
        frame: Bytes,
    },
    Reflect,
}

/// A gRPC answer: one data frame, then the trailers.
type GrpcBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

fn usage() -> ! {
    eprintln!(
        "usage: demo-shop inventory [--port P]\n       demo-shop orders [--port P] [--inventory HOST:PORT] [--version V]\n       demo-shop echo [--port P] [--size BYTES]\n       demo-shop echo-grpc [--port P] [--size BYTES]\n       demo-shop reflect [--port P]\n       every role: [--delay-ms N [--delay-rate F]]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_else(|| usage());
    let mut port = 8080u16;
    let mut inventory = String::from("inventory:8080");
    let mut size = 1024usize;
    let mut version = String::from("v1");
    let mut delay = Delay::default();
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--port" => port = value.parse().context("--port")?,
            "--inventory" => inventory = value,
            "--size" => size = value.parse().context("--size")?,
            "--version" => version = value,
            "--delay-ms" => delay.ms = value.parse().context("--delay-ms")?,
            "--delay-rate" => delay.rate = value.parse().context("--delay-rate")?,
            _ => usage(),
        }
    }
    if !(0.0..=1.0).contains(&delay.rate) {
        bail!("--delay-rate must be within 0..1");
    }
    let app = match role.as_str() {
        "inventory" => App::Inventory,
        "orders" => App::Orders {
            inventory: inventory.into(),
            version: version.into(),
        },
        "reflect" => App::Reflect,
        "echo" => App::Echo {
            body: Bytes::from(vec![b'x'; size]),
        },
        "echo-grpc" => App::EchoGrpc {
            frame: grpc_frame(size)?,
        },
        _ => usage(),
    };
    // Dual-stack where the host has IPv6, so the app answers on its pod's v4 and v6 addresses.
    let listener = match TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?,
    };
    eprintln!("demo-shop {role} listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        if matches!(app, App::EchoGrpc { .. }) {
            // As gRPC servers do: an HTTP/2 answer is several writes (headers, data,
            // trailers), and Nagle would hold the last ones for the client's delayed ACK.
            let _ = stream.set_nodelay(true);
        }
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move {
                    delay.wait().await;
                    Ok::<_, hyper::Error>(match &app {
                        App::EchoGrpc { frame } => echo_grpc(frame, req).await.map(Either::Right),
                        _ => handle(&app, req).await.map(Either::Left),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `--delay-ms` and `--delay-rate`: how long to hold an answer, and how many answers.
#[derive(Clone, Copy)]
struct Delay {
    ms: u64,
    rate: f64,
}

impl Default for Delay {
    fn default() -> Self {
        Delay { ms: 0, rate: 1.0 }
    }
}

impl Delay {
    async fn wait(self) {
        if self.ms == 0 || self.rate <= 0.0 {
            return;
        }
        // A fresh random 64-bit value from the standard library's per-process random keys.
        use std::hash::{BuildHasher, Hasher};
        let draw = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let uniform = (draw >> 11) as f64 / (1u64 << 53) as f64;
        if self.rate >= 1.0 || uniform < self.rate {
            tokio::time::sleep(std::time::Duration::from_millis(self.ms)).await;
        }
    }
}

fn pod() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into())
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gRPC message of `size` bytes behind its length prefix (uncompressed).
fn grpc_frame(size: usize) -> Result<Bytes> {
    let len = u32::try_from(size).context("--size is too large for a gRPC message")?;
    let mut frame = Vec::with_capacity(5 + size);
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.resize(5 + size, b'x');
    Ok(Bytes::from(frame))
}

/// Reads the call's request (as a gRPC server would), then answers with the message and
/// `grpc-status: 0` in the trailers.
async fn echo_grpc(frame: &Bytes, req: Request<Incoming>) -> Response<GrpcBody> {
    let read = req.into_body().collect().await;
    let mut trailers = HeaderMap::new();
    let (body, status) = match read {
        Ok(_) => (frame.clone(), "0"),
        // 13: INTERNAL.
        Err(_) => (Bytes::new(), "13"),
    };
    trailers.insert(
        "grpc-status",
        hyper::header::HeaderValue::from_static(status),
    );
    let mut resp =
        Response::new(Full::new(body).with_trailers(std::future::ready(Some(Ok(trailers)))));
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    resp
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match app {
        App::Echo { body } => {
            let mut resp = Response::new(Full::new(body.clone()));
            if let Ok(pod) = hyper::header::HeaderValue::from_str(&pod()) {
                resp.headers_mut().insert("x-pod", pod);
            }
            resp
        }
        App::EchoGrpc { .. } => unreachable!("served by echo_grpc"),
        App::Reflect => reflect(req).await,
        App::Inventory => match path.strip_prefix("/stock/") {
            Some(item) if !item.is_empty() => {
                // A stable, item-dependent figure: the demo shows the same stock from every replica.
                let stock = item.bytes().map(u32::from).sum::<u32>() % 50;
                reply(
                    StatusCode::OK,
                    json!({"item": item, "stock": stock, "pod": pod(), "zone": std::env::var("POD_ZONE").ok()}),
                )
            }
            _ => reply(
                StatusCode::OK,
                json!({"service": "inventory", "pod": pod()}),
            ),
        },
        App::Orders { inventory, version } => match path.strip_prefix("/orders/") {
            Some(item) if !item.is_empty() => {
                match get_json(inventory, &format!("/stock/{item}")).await {
                    Ok(stock) => reply(
                        StatusCode::OK,
                        json!({"order": item, "accepted": stock["stock"].as_u64().unwrap_or(0) > 0, "pod": pod(), "version": &**version, "inventory": stock}),
                    ),
                    Err(e) => reply(
                        StatusCode::BAD_GATEWAY,
                        json!({"error": format!("inventory: {e:#}"), "pod": pod()}),
                    ),
                }
            }
            _ => reply(
                StatusCode::OK,
                json!({"service": "orders", "pod": pod(), "version": &**version}),
            ),
        },
    }
}

/// The request as received, as JSON; `/delay/<ms>` and `/status/<code>` change the answer.
async fn reflect(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    let path = parts.uri.path();
    let mut status = StatusCode::OK;
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        status = code;
    }
    // Repeated fields join with commas, as one value (RFC 9110 §5.3).
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.to_string(), json!(values.join(",")));
    }
    reply(
        status,
        json!({
            "pod": pod(),
            "method": parts.method.as_str(),
            "path": path,
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "bodyBytes": body.len(),
        }),
    )
}

/// One HTTP/1.1 GET to `authority` (host:port, resolved through /etc/hosts like any app would).
async fn get_json(authority: &str, path: &str) -> Result<serde_json::Value> {
    let stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", authority)
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    drop(sender);
    let _ = conn.await;
    if !status.is_success() {
        bail!("{status}");
    }
    Ok(serde_json::from_slice(&body)?)
}
