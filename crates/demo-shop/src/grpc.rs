//! The payment service's gRPC (`muon.demo.Payment/Charge`, unary), encoded by hand: two small
//! messages do not need a protobuf compiler.
//!
//! ```proto
//! package muon.demo;
//! service Payment { rpc Charge(ChargeRequest) returns (ChargeReply); }
//! message ChargeRequest { string order = 1; uint64 amount_cents = 2; }
//! message ChargeReply { string pod = 1; string zone = 2; string charge_id = 3; }
//! ```
//!
//! The server answers every call with headers, at most one message and the trailers
//! (`grpc-status`), never trailers-only, so every client reads the status the same way
//! (gRPC over HTTP/2: <https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).
//! The client (orders) keeps one HTTP/2 connection (prior knowledge) to `payment:9090`; the
//! sidecar balances each call on it.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Ready;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpStream;

pub const CHARGE: &str = "/muon.demo.Payment/Charge";

/// gRPC status codes used here.
pub const OK: u32 = 0;
pub const INVALID_ARGUMENT: u32 = 3;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;

/// A gRPC answer: one data frame (maybe empty), then the trailers.
pub type GrpcBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChargeRequest {
    pub order: String,
    pub amount_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChargeReply {
    pub pod: String,
    pub zone: String,
    pub charge_id: String,
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A length-delimited field (wire type 2); proto3 leaves empty strings out.
fn put_string(buf: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_varint(buf, u64::from(field << 3 | 2));
        put_varint(buf, s.len() as u64);
        buf.extend_from_slice(s.as_bytes());
    }
}

/// A varint field (wire type 0); proto3 leaves zeros out.
fn put_uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_varint(buf, u64::from(field << 3));
        put_varint(buf, v);
    }
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).context("truncated varint")?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint longer than 10 bytes")
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Every field of a message: (number, value); 32- and 64-bit fields are skipped.
fn fields(b: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let key = varint(b, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((number, Field::Varint(varint(b, &mut at)?))),
            2 => {
                let len = usize::try_from(varint(b, &mut at)?)?;
                let end = at.checked_add(len).filter(|&e| e <= b.len());
                let end = end.context("length-delimited field runs past the message")?;
                out.push((number, Field::Bytes(&b[at..end])));
                at = end;
            }
            1 => at += 8,
            5 => at += 4,
            w => bail!("unsupported wire type {w}"),
        }
    }
    if at > b.len() {
        bail!("truncated fixed-width field");
    }
    Ok(out)
}

fn string(v: &[u8]) -> Result<String> {
    String::from_utf8(v.to_vec()).context("a string field is not UTF-8")
}

impl ChargeRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, 1, &self.order);
        put_uint(&mut b, 2, self.amount_cents);
        b
    }

    pub fn decode(b: &[u8]) -> Result<ChargeRequest> {
        let mut m = ChargeRequest::default();
        for (n, f) in fields(b)? {
            match (n, f) {
                (1, Field::Bytes(v)) => m.order = string(v)?,
                (2, Field::Varint(v)) => m.amount_cents = v,
                _ => {}
            }
        }
        Ok(m)
    }
}

impl ChargeReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, 1, &self.pod);
        put_string(&mut b, 2, &self.zone);
        put_string(&mut b, 3, &self.charge_id);
        b
    }

    pub fn decode(b: &[u8]) -> Result<ChargeReply> {
        let mut m = ChargeReply::default();
        for (n, f) in fields(b)? {
            match (n, f) {
                (1, Field::Bytes(v)) => m.pod = string(v)?,
                (2, Field::Bytes(v)) => m.zone = string(v)?,
                (3, Field::Bytes(v)) => m.charge_id = string(v)?,
                _ => {}
            }
        }
        Ok(m)
    }
}

/// A message behind its 5-byte prefix (uncompressed).
pub fn frame(message: &[u8]) -> Result<Bytes> {
    let len = u32::try_from(message.len()).context("message too large for gRPC")?;
    let mut b = Vec::with_capacity(5 + message.len());
    b.push(0);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(message);
    Ok(Bytes::from(b))
}

/// The one message of a unary call's body.
pub fn unframe(body: &[u8]) -> Result<&[u8]> {
    let Some((prefix, rest)) = body.split_first_chunk::<5>() else {
        bail!("no gRPC message ({} bytes)", body.len());
    };
    if prefix[0] != 0 {
        bail!("compressed messages are not supported");
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if rest.len() != len {
        bail!("message length {len}, but {} bytes follow", rest.len());
    }
    Ok(rest)
}

/// An answer: the headers, `body` (already framed, or empty) and the trailers.
pub fn answer(body: Bytes, status: u32, message: &str) -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if let Ok(m) = HeaderValue::from_str(message) {
        if !message.is_empty() {
            trailers.insert("grpc-message", m);
        }
    }
    let mut resp =
        Response::new(Full::new(body).with_trailers(std::future::ready(Some(Ok(trailers)))));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

/// Charges made by this process, for the charge ids.
static CHARGES: AtomicU64 = AtomicU64::new(0);

/// The payment server: `Charge` answers with the pod (and zone) that charged.
pub async fn payment(req: Request<Incoming>) -> Response<GrpcBody> {
    if req.uri().path() != CHARGE {
        let path = req.uri().path().to_string();
        return answer(Bytes::new(), UNIMPLEMENTED, &format!("no method {path}"));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return answer(Bytes::new(), INTERNAL, &e.to_string()),
    };
    let charge = match unframe(&body).and_then(ChargeRequest::decode) {
        Ok(c) => c,
        Err(e) => return answer(Bytes::new(), INVALID_ARGUMENT, &format!("{e:#}")),
    };
    let pod = super::pod();
    let n = CHARGES.fetch_add(1, Ordering::Relaxed) + 1;
    let reply = ChargeReply {
        charge_id: format!("{pod}-{n}-{}", charge.order),
        zone: std::env::var("POD_ZONE").unwrap_or_default(),
        pod,
    };
    match frame(&reply.encode()) {
        Ok(f) => answer(f, OK, ""),
        Err(e) => answer(Bytes::new(), INTERNAL, &format!("{e:#}")),
    }
}

/// Orders' client of payment: one HTTP/2 connection, made again when it closed.
pub struct PaymentClient {
    authority: String,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl PaymentClient {
    pub fn new(authority: String) -> PaymentClient {
        PaymentClient {
            authority,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = conn.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .context("HTTP/2 handshake")?;
        tokio::spawn(connection);
        *conn = Some(sender.clone());
        Ok(sender)
    }

    /// One `Charge` call; an error unless `grpc-status` is 0.
    pub async fn charge(&self, charge: &ChargeRequest) -> Result<ChargeReply> {
        let mut sender = self.sender().await?;
        let req = Request::post(format!("http://{}{CHARGE}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(frame(&charge.encode())?))?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        if parts.status != hyper::StatusCode::OK {
            bail!("HTTP {}", parts.status);
        }
        let collected = body.collect().await?;
        // Trailers-only answers carry the status in the headers.
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status_of = |h: &HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
        };
        let status = status_of(&trailers).or_else(|| status_of(&parts.headers));
        match status {
            Some(OK) => {}
            Some(code) => {
                let message = trailers
                    .get("grpc-message")
                    .or_else(|| parts.headers.get("grpc-message"))
                    .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                    .unwrap_or_default();
                bail!("grpc-status {code} {message}");
            }
            None => bail!("no grpc-status"),
        }
        let body = collected.to_bytes();
        ChargeReply::decode(unframe(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let req = ChargeRequest {
            order: "widget".into(),
            amount_cents: 1299,
        };
        assert_eq!(ChargeRequest::decode(&req.encode()).unwrap(), req);
        let reply = ChargeReply {
            pod: "payment-a".into(),
            zone: "zone-a".into(),
            charge_id: "payment-a-1-widget".into(),
        };
        assert_eq!(ChargeReply::decode(&reply.encode()).unwrap(), reply);
    }

    #[test]
    fn encoding_matches_protobuf() {
        // protoc --encode=ChargeRequest: order "ab", amount_cents 300.
        let req = ChargeRequest {
            order: "ab".into(),
            amount_cents: 300,
        };
        assert_eq!(req.encode(), [0x0a, 2, b'a', b'b', 0x10, 0xac, 0x02]);
        // Unknown fields (a fixed64, a later string) are skipped.
        let mut b = vec![0x19, 1, 2, 3, 4, 5, 6, 7, 8];
        b.extend_from_slice(&[0x22, 1, b'x', 0x0a, 1, b'p']);
        assert_eq!(ChargeReply::decode(&b).unwrap().pod, "p");
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(ChargeRequest::decode(&[0x0a, 5, b'a']).is_err());
        assert!(ChargeRequest::decode(&[0x10, 0xff]).is_err());
        assert!(ChargeRequest::decode(&[0x19, 1, 2]).is_err());
        assert!(unframe(&[0, 0, 0, 0, 2, 1]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err());
        assert_eq!(unframe(&frame(b"hi").unwrap()).unwrap(), b"hi");
    }
}
