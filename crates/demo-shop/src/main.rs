//! The demo shop: the example application the demo, the tests and the benchmarks run in the lab.
//!
//! - `demo-shop inventory` answers `GET /stock/<item>` with the stock and the pod that answered;
//! - `demo-shop orders` answers `GET /orders/<item>` by asking inventory over HTTP/1.1 JSON
//!   for the stock, then charging through payment over gRPC; the answer names both pods;
//! - `demo-shop payment` serves the gRPC method `muon.demo.Payment/Charge` (port 9090 by
//!   default) and answers with the pod that charged ([`grpc`]);
//! - `demo-shop echo` answers every request with a fixed-size body and `x-pod: <POD_NAME>`
//!   (for benchmarks);
//! - `demo-shop echo-grpc` answers every request (a gRPC unary call, whatever the method) with
//!   one gRPC-framed message of a fixed size and the trailer `grpc-status: 0` (for benchmarks);
//! - `demo-shop reflect` answers with what it received (method, path, protocol, headers,
//!   body size) as JSON; `/delay/<ms>` answers after a pause, `/status/<code>` with that
//!   status (for the tests).
//!
//! Every app serves HTTP/1.1 and HTTP/2 (prior knowledge) on the same port, and can be made
//! to fail or slow down, at start or while it runs ([`faults`]: `/admin/faults`,
//! `/admin/stats`).
//!
//! The apps know nothing of the mesh: they call `http://inventory:8080` by name, and the
//! sidecars do the rest. Every answer names the pod (from `POD_NAME`) so that a caller can see
//! where the mesh sent it.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

mod faults;
mod grpc;

#[derive(Clone)]
enum App {
    Inventory,
    Orders {
        inventory: Arc<str>,
        payment: Arc<grpc::PaymentClient>,
        version: Arc<str>,
    },
    Payment,
    Echo {
        body: Bytes,
    },
    /// The whole answer's body: the 5-byte gRPC prefix and the message.
    EchoGrpc {
        frame: Bytes,
    },
    Reflect,
}

impl App {
    /// Whether the app speaks gRPC (its faults are `grpc-status: 14`, not 503).
    fn is_grpc(&self) -> bool {
        matches!(self, App::Payment | App::EchoGrpc { .. })
    }
}

const USAGE: &str = "usage: demo-shop inventory [--port P]
       demo-shop orders [--port P] [--inventory HOST:PORT] [--payment HOST:PORT] [--version V]
       demo-shop payment [--port P]
       demo-shop echo [--port P] [--size BYTES]
       demo-shop echo-grpc [--port P] [--size BYTES]
       demo-shop reflect [--port P]
every role also takes --fail-rate F (0..1: the share answered 503, gRPC UNAVAILABLE),
--delay-ms N and --delay-rate F (default 1 with --delay-ms); /admin/faults?fail-rate=..
changes them while it runs, /admin/stats counts requests";

/// The command line, parsed.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    role: String,
    port: u16,
    inventory: String,
    payment: String,
    size: usize,
    version: String,
    faults: faults::Settings,
}

const ROLES: [&str; 6] = [
    "inventory",
    "orders",
    "payment",
    "echo",
    "echo-grpc",
    "reflect",
];

/// Parses the arguments after the program's name, reporting every problem at once.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Config, String> {
    let role = args.next().unwrap_or_default();
    let mut problems = Vec::new();
    if !ROLES.contains(&role.as_str()) {
        problems.push(format!("unknown role {role:?}"));
    }
    let mut c = Config {
        port: if role == "payment" { 9090 } else { 8080 },
        role,
        inventory: "inventory:8080".into(),
        payment: "payment:9090".into(),
        size: 1024,
        version: "v1".into(),
        faults: faults::Settings::default(),
    };
    let mut changes = faults::Changes::default();
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            problems.push(format!("{flag} needs a value"));
            break;
        };
        let mut number = |field: &mut dyn FnMut(&str) -> bool| {
            if !field(&value) {
                problems.push(format!("{flag}: not a valid number: {value:?}"));
            }
        };
        match flag.as_str() {
            "--port" => number(&mut |v| v.parse().map(|p| c.port = p).is_ok()),
            "--size" => number(&mut |v| v.parse().map(|s| c.size = s).is_ok()),
            "--inventory" => c.inventory = value,
            "--payment" => c.payment = value,
            "--version" => c.version = value,
            f => match f.strip_prefix("--").map(|key| changes.set(key, &value)) {
                Some(Ok(true)) => {}
                Some(Err(e)) => problems.push(format!("--{e}")),
                _ => problems.push(format!("unknown flag {flag}")),
            },
        }
    }
    c.faults = changes.apply(c.faults);
    match problems.is_empty() {
        true => Ok(c),
        false => Err(problems.join("\n")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo-shop: {e}\n{USAGE}");
            std::process::exit(2)
        }
    };
    let app = match config.role.as_str() {
        "inventory" => App::Inventory,
        "orders" => App::Orders {
            inventory: config.inventory.into(),
            payment: Arc::new(grpc::PaymentClient::new(config.payment)),
            version: config.version.into(),
        },
        "payment" => App::Payment,
        "reflect" => App::Reflect,
        "echo" => App::Echo {
            body: Bytes::from(vec![b'x'; config.size]),
        },
        _ => App::EchoGrpc {
            frame: grpc::frame(&vec![b'x'; config.size])
                .context("--size is too large for a gRPC message")?,
        },
    };
    let faults = Arc::new(faults::Faults::new(config.faults));
    let port = config.port;
    // Dual-stack where the host has IPv6, so the app answers on its pod's v4 and v6 addresses.
    let listener = match TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?,
    };
    eprintln!(
        "demo-shop {} listening on {}",
        config.role,
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        if app.is_grpc() {
            // As gRPC servers do: an HTTP/2 answer is several writes (headers, data,
            // trailers), and Nagle would hold the last ones for the client's delayed ACK.
            let _ = stream.set_nodelay(true);
        }
        let app = app.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                let faults = faults.clone();
                async move { Ok::<_, hyper::Error>(serve(&app, &faults, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request: the admin paths, else the faults' decision, then the app.
async fn serve(
    app: &App,
    faults: &faults::Faults,
    req: Request<Incoming>,
) -> Response<Either<Full<Bytes>, grpc::GrpcBody>> {
    if let Some(resp) = faults.admin(req.uri().path(), req.uri().query()) {
        return resp.map(Either::Left);
    }
    let decision = faults.next();
    if let Some(delay) = decision.delay {
        tokio::time::sleep(delay).await;
    }
    if decision.fail {
        return match app.is_grpc() {
            true => {
                grpc::answer(Bytes::new(), grpc::UNAVAILABLE, "injected fault").map(Either::Right)
            }
            false => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "injected fault", "pod": pod()}),
            )
            .map(Either::Left),
        };
    }
    match app {
        App::EchoGrpc { frame } => echo_grpc(frame, req).await.map(Either::Right),
        App::Payment => grpc::payment(req).await.map(Either::Right),
        _ => handle(app, req).await.map(Either::Left),
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

/// Reads the call's request (as a gRPC server would), then answers with the message and
/// `grpc-status: 0` in the trailers.
async fn echo_grpc(frame: &Bytes, req: Request<Incoming>) -> Response<grpc::GrpcBody> {
    match req.into_body().collect().await {
        Ok(_) => grpc::answer(frame.clone(), grpc::OK, ""),
        Err(_) => grpc::answer(Bytes::new(), grpc::INTERNAL, ""),
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match app {
        App::Echo { body } => {
            // The pod in a header: a load generator tells replicas apart without the body.
            let mut resp = Response::new(Full::new(body.clone()));
            if let Ok(pod) = hyper::header::HeaderValue::from_str(&pod()) {
                resp.headers_mut().insert("x-pod", pod);
            }
            resp
        }
        App::EchoGrpc { .. } | App::Payment => unreachable!("served by serve"),
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
        App::Orders {
            inventory,
            payment,
            version,
        } => match path.strip_prefix("/orders/") {
            Some(item) if !item.is_empty() => order(inventory, payment, version, item).await,
            _ => reply(
                StatusCode::OK,
                json!({"service": "orders", "pod": pod(), "version": &**version}),
            ),
        },
    }
}

/// An order: the stock from inventory, then (when in stock) a charge through payment.
async fn order(
    inventory: &str,
    payment: &grpc::PaymentClient,
    version: &str,
    item: &str,
) -> Response<Full<Bytes>> {
    let stock = match get_json(inventory, &format!("/stock/{item}")).await {
        Ok(stock) => stock,
        Err(e) => {
            return reply(
                StatusCode::BAD_GATEWAY,
                json!({"error": format!("inventory: {e:#}"), "pod": pod(), "version": version}),
            )
        }
    };
    let in_stock = stock["stock"].as_u64().unwrap_or(0) > 0;
    let mut charged = None;
    if in_stock {
        let charge = grpc::ChargeRequest {
            order: item.to_string(),
            // A stable, item-dependent price.
            amount_cents: 100 + item.bytes().map(u64::from).sum::<u64>() % 900,
        };
        match payment.charge(&charge).await {
            Ok(c) => charged = Some(c),
            Err(e) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    json!({"error": format!("payment: {e:#}"), "pod": pod(), "version": version, "inventory": stock}),
                )
            }
        }
    }
    let payment = charged.map(|c| json!({"pod": c.pod, "zone": c.zone, "chargeId": c.charge_id}));
    reply(
        StatusCode::OK,
        json!({"order": item, "accepted": in_stock, "pod": pod(), "version": version, "inventory": stock, "payment": payment}),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Config, String> {
        parse_args(args.split_whitespace().map(String::from))
    }

    #[test]
    fn roles_keep_their_defaults() {
        let c = parse("orders").unwrap();
        assert_eq!(
            (c.port, &*c.inventory, &*c.payment, &*c.version),
            (8080, "inventory:8080", "payment:9090", "v1")
        );
        assert_eq!(c.faults, faults::Settings::default());
        assert_eq!(parse("payment").unwrap().port, 9090);
        assert_eq!(parse("payment --port 7000").unwrap().port, 7000);
        assert_eq!(parse("inventory").unwrap().port, 8080);
    }

    #[test]
    fn fault_flags_are_parsed() {
        let c = parse("inventory --fail-rate 0.5 --delay-ms 50").unwrap();
        assert_eq!(
            c.faults,
            faults::Settings {
                fail_rate: 0.5,
                delay_ms: 50,
                delay_rate: 1.0
            }
        );
        let c = parse("payment --delay-rate 0.1 --delay-ms 20").unwrap();
        assert_eq!((c.faults.delay_ms, c.faults.delay_rate), (20, 0.1));
    }

    #[test]
    fn every_problem_is_reported() {
        let e = parse("orders --port x --fail-rate 2 --colour red --version").unwrap_err();
        assert!(e.contains("--port: not a valid number"), "{e}");
        assert!(e.contains("--fail-rate must be a fraction"), "{e}");
        assert!(e.contains("unknown flag --colour"), "{e}");
        assert!(e.contains("--version needs a value"), "{e}");
        assert!(parse("shipping").unwrap_err().contains("unknown role"));
    }
}
