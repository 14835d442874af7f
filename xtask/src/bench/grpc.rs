//! The gRPC unary generator (`muon-bench bench grpc-load`): the same open and closed loops as
//! `load` (see there: due times, coordinated omission, histograms), but each request is a
//! unary gRPC call over HTTP/2 with prior knowledge, as a gRPC client app would make it.
//!
//! A call is `POST /muon.bench.Echo/Call` with `content-type: application/grpc`, `te:
//! trailers` and one length-prefixed message; the answer must be status 200, one message of
//! the expected size and `grpc-status: 0` (in the trailers, or in the headers of a
//! trailers-only answer). `--streams` callers share `--connections` HTTP/2 connections (the
//! first caller of each connection on it, the next on the next one), each with one call in
//! flight at a time, so `--streams` is the concurrency.
//!
//! hyper's HTTP/2 client directly: no codec, no tower buffer, so the generator costs as little
//! as it can on a machine whose cores the proxies need.

use super::load::{self, Caller, LoadReport, Shape};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct GrpcLoadArgs {
    /// Target `IP:PORT` of a gRPC server (HTTP/2 without TLS).
    #[arg(long)]
    pub addr: SocketAddr,
    /// The method's path.
    #[arg(long, default_value = "/muon.bench.Echo/Call")]
    pub method: String,
    /// Calls per second, open loop. Without it: closed loop (maximum throughput).
    #[arg(long)]
    pub rate: Option<f64>,
    /// HTTP/2 connections, all opened before the clock starts.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Callers, each with one call in flight at a time, spread over the connections.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = load::parse_duration)]
    pub duration: Duration,
    /// Load at the same rate before measuring (not in the percentiles).
    #[arg(long, default_value = "1s", value_parser = load::parse_duration)]
    pub warmup: Duration,
    /// Size of the request message.
    #[arg(long, default_value_t = 64)]
    pub request_size: usize,
    /// Expected size of the answer's message; any other size is an error.
    #[arg(long)]
    pub expect_size: Option<usize>,
    /// Print the report as JSON (for the harness) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_grpc_load(args: &GrpcLoadArgs) -> Result<()> {
    if args.connections == 0 || args.connections > 1000 {
        bail!("--connections must be 1..=1000");
    }
    if args.streams < args.connections || args.streams > 10_000 {
        bail!("--streams must be at least --connections and at most 10000");
    }
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate <= 1_000_000.0) {
            bail!("--rate must be in (0, 1000000]");
        }
    }
    let report = load::runtime()?.block_on(grpc_load(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let l = &report.latency_us;
        println!(
            "gRPC {} loop to {}: {} calls in {:.1}s ({:.0}/s), {} errors, {} unsent\nlatency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            report.mode, report.target, report.requests, report.duration_s, report.achieved_rps,
            report.errors, report.unsent, l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
    Ok(())
}

/// A gRPC message of `size` bytes behind its length prefix (uncompressed).
pub fn frame(size: usize) -> Bytes {
    let mut f = Vec::with_capacity(5 + size);
    f.push(0);
    f.extend_from_slice(&(size as u32).to_be_bytes());
    f.resize(5 + size, 0x5a);
    Bytes::from(f)
}

async fn grpc_load(args: &GrpcLoadArgs) -> Result<LoadReport> {
    let uri: Uri = format!("http://{}{}", args.addr, args.method)
        .parse()
        .context("--method is not a path")?;
    let request = frame(args.request_size);
    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        senders.push(
            handshake(args.addr)
                .await
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }
    let mut callers: Vec<GrpcCaller> = (0..args.streams)
        .map(|i| GrpcCaller {
            addr: args.addr,
            uri: uri.clone(),
            request: request.clone(),
            expect_size: args.expect_size,
            sender: Some(senders[i % senders.len()].clone()),
        })
        .collect();
    // One call on every connection before the clock starts (no handshake in the figures).
    for c in callers.iter_mut().take(args.connections) {
        c.call()
            .await
            .with_context(|| format!("first call to {}", args.addr))?;
    }
    let shape = Shape {
        target: args.addr.to_string(),
        rate: args.rate,
        connections: args.connections,
        streams: Some(args.streams),
        warmup: args.warmup,
        duration: args.duration,
    };
    load::drive(callers, shape).await
}

async fn handshake(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = load::open(addr).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct GrpcCaller {
    addr: SocketAddr,
    uri: Uri,
    request: Bytes,
    expect_size: Option<usize>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Caller for GrpcCaller {
    async fn call(&mut self) -> Result<()> {
        let Some(sender) = self.sender.as_mut() else {
            bail!("not connected to {}", self.addr);
        };
        let req = Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", "muon-bench")
            .body(Full::new(self.request.clone()))?;
        sender.ready().await.context("the connection is closed")?;
        let resp = sender.send_request(req).await.context("sending the call")?;
        let status = resp.status();
        if status != hyper::StatusCode::OK {
            bail!("HTTP status {status}");
        }
        // A trailers-only answer carries its grpc-status in the headers.
        let head_status = resp.headers().get("grpc-status").cloned();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the answer")?;
        let grpc_status = body
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(head_status);
        match grpc_status.as_ref().map(|v| v.as_bytes()) {
            Some(b"0") => {}
            Some(other) => bail!("grpc-status {}", String::from_utf8_lossy(other)),
            None => bail!("answer without grpc-status"),
        }
        let data = body.to_bytes();
        if data.len() < 5 || data[0] != 0 {
            bail!("answer is not one uncompressed gRPC message");
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if len + 5 != data.len() {
            bail!("answer of {} bytes, its message says {len}", data.len() - 5);
        }
        if let Some(want) = self.expect_size {
            if len != want {
                bail!("message of {len} bytes, expected {want}");
            }
        }
        Ok(())
    }

    async fn reconnect(&mut self) {
        // Only a dead connection is replaced; a failed call on a live one keeps it.
        if self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            return;
        }
        self.sender = tokio::time::timeout(load::REQUEST_TIMEOUT, handshake(self.addr))
            .await
            .ok()
            .and_then(|r| r.ok());
        if self.sender.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::combinators::WithTrailers;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{HeaderMap, Response};
    use std::convert::Infallible;

    type Answer =
        WithTrailers<Full<Bytes>, std::future::Ready<Option<Result<HeaderMap, Infallible>>>>;

    /// An HTTP/2 server like `demo-shop echo-grpc`, with the grpc-status it is given.
    async fn server(status: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", status.parse().unwrap());
                        let body: Answer =
                            Full::new(frame(1024)).with_trailers(std::future::ready(Some(Ok(t))));
                        Ok::<_, Infallible>(Response::new(body))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn args(addr: SocketAddr) -> GrpcLoadArgs {
        GrpcLoadArgs {
            addr,
            method: "/muon.bench.Echo/Call".into(),
            rate: Some(500.0),
            connections: 2,
            streams: 4,
            duration: Duration::from_millis(400),
            warmup: Duration::ZERO,
            request_size: 64,
            expect_size: Some(1024),
            json: true,
        }
    }

    #[test]
    fn unary_calls_are_paced_and_checked() {
        let rt = load::runtime().unwrap();
        rt.block_on(async {
            let addr = server("0").await;
            let r = grpc_load(&args(addr)).await.unwrap();
            assert_eq!(r.errors, 0, "{:?}", r.first_error);
            assert_eq!(r.requests, 200);
            assert_eq!(r.streams, Some(4));
            let closed = grpc_load(&GrpcLoadArgs {
                rate: None,
                ..args(addr)
            })
            .await
            .unwrap();
            assert!(closed.requests > 10, "{closed:?}");
            assert_eq!(closed.errors, 0, "{:?}", closed.first_error);
        });
    }

    #[test]
    fn a_failed_status_or_a_wrong_size_is_an_error() {
        let rt = load::runtime().unwrap();
        rt.block_on(async {
            let addr = server("14").await;
            let e = grpc_load(&args(addr)).await.unwrap_err();
            assert!(format!("{e:#}").contains("grpc-status 14"), "{e:#}");
            let addr = server("0").await;
            let e = grpc_load(&GrpcLoadArgs {
                expect_size: Some(10),
                ..args(addr)
            })
            .await
            .unwrap_err();
            assert!(format!("{e:#}").contains("expected 10"), "{e:#}");
        });
    }
}
