//! Protocol detection: what a client speaks, from its first bytes, with a bounded wait.
//!
//! [`classify`] is pure: given the bytes so far it says HTTP/1, HTTP/2 (prior knowledge),
//! TLS, opaque, or "need more". [`sniff`] reads until it can tell, up to [`MAX_SNIFF`] bytes
//! and a deadline: a client that sends nothing (a server-first protocol, such as SMTP or
//! MySQL) gets [`Detected::Timeout`] and is carried as opaque bytes. [`Prefixed`] hands the
//! bytes read back to whoever reads the stream next (after linkerd2-proxy's `PrefixedIo`), so
//! detection never loses a byte.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Detection never reads more than this before deciding.
pub const MAX_SNIFF: usize = 1024;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// HTTP/2 with prior knowledge (h2c, or gRPC in plaintext).
    Http2,
    /// A TLS ClientHello: passed through untouched.
    Tls,
    /// Anything else, or the client closed before saying anything.
    Opaque,
    /// Nothing arrived within the deadline: a server-first protocol, carried as opaque.
    Timeout,
}

/// Classifies the bytes a client sent first; `None`: not enough bytes to tell yet.
pub fn classify(b: &[u8]) -> Option<Detected> {
    if b.is_empty() {
        return None;
    }
    // TLS record header: handshake (22), version 3.x.
    if b[0] == 0x16 {
        return match b.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if b[0] == b'P' {
        let n = b.len().min(H2_PREFACE.len());
        if b[..n] == H2_PREFACE[..n] {
            return (n == H2_PREFACE.len()).then_some(Detected::Http2);
        }
    }
    http1(b)
}

/// An HTTP/1 request line starts `METHOD SP request-target`: a method token (RFC 9110 §9:
/// uppercase letters here, as every registered method is) of 3–16 bytes, one space, and a
/// target that starts like an origin (`/`), absolute (`h`ttp://), authority (CONNECT) or
/// asterisk (`*`) form. The rest of the line can be long; hyper checks it.
fn http1(b: &[u8]) -> Option<Detected> {
    const MAX_METHOD: usize = 16;
    let method = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if method == b.len() {
        return match method < MAX_METHOD {
            true => None,
            false => Some(Detected::Opaque),
        };
    }
    if !(3..=MAX_METHOD).contains(&method) || b[method] != b' ' {
        return Some(Detected::Opaque);
    }
    match b.get(method + 1) {
        None => None,
        Some(c) if c.is_ascii_graphic() => Some(Detected::Http1),
        Some(_) => Some(Detected::Opaque),
    }
}

/// Reads from `io` into `buf` until [`classify`] decides, the client stops sending (EOF),
/// `MAX_SNIFF` bytes arrived, or `timeout` passed.
pub async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(buf) {
            return Ok(d);
        }
        if buf.len() >= MAX_SNIFF {
            return Ok(Detected::Opaque);
        }
        buf.reserve(MAX_SNIFF - buf.len());
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) if buf.is_empty() => return Ok(Detected::Timeout),
            // Some bytes but undecided by the deadline: not a protocol we look into.
            Err(_) => return Ok(Detected::Opaque),
            Ok(Ok(0)) => return Ok(Detected::Opaque),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A TLS ClientHello is read this far at most to find its ALPN.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What a TLS ClientHello asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not complete yet.
    More,
    /// Parsed: the ALPN protocols it offers (empty: none).
    Alpn(Vec<Vec<u8>>),
    /// Not a ClientHello rustls can read.
    Invalid,
}

/// Parses the ClientHello at the start of `b` with rustls (nothing is answered).
pub fn client_hello(b: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = b;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Hello::Invalid;
        }
    }
    match acceptor.accept() {
        Ok(None) => Hello::More,
        Ok(Some(accepted)) => Hello::Alpn(
            accepted
                .client_hello()
                .alpn()
                .map(|a| a.map(<[u8]>::to_vec).collect())
                .unwrap_or_default(),
        ),
        Err(_) => Hello::Invalid,
    }
}

/// After [`sniff`] said TLS: reads on (into `buf`, up to [`MAX_CLIENT_HELLO`] and the
/// deadline) until the ClientHello is whole; its ALPN protocols, or `None` when it is not
/// one (or never completes).
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Option<Vec<Vec<u8>>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match client_hello(buf) {
            Hello::Alpn(a) => return Ok(Some(a)),
            Hello::Invalid => return Ok(None),
            Hello::More if buf.len() >= MAX_CLIENT_HELLO => return Ok(None),
            Hello::More => {}
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream whose first reads return `prefix` (bytes already read from it), then the rest.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Prefixed { prefix, io }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_says_its_alpn_once_whole() {
        // A real ClientHello, from rustls.
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![b"muon/h2".to_vec()];
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "198.18.0.2".try_into().unwrap(),
        )
        .unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert_eq!(classify(&hello), Some(Detected::Tls));
        assert_eq!(client_hello(&hello[..hello.len() / 2]), Hello::More);
        assert_eq!(client_hello(&hello), Hello::Alpn(vec![b"muon/h2".to_vec()]));
        assert_eq!(client_hello(b"\x16\x03\x01\x00\x05hello"), Hello::Invalid);
    }
    use tokio::io::AsyncWriteExt;

    #[test]
    fn first_bytes_tell_the_protocol_or_ask_for_more() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Some(Detected::Http1)),
            (b"POST /items", Some(Detected::Http1)),
            (b"CONNECT example.com:443 HTTP/1.1", Some(Detected::Http1)),
            (b"OPTIONS * HTTP/1.1", Some(Detected::Http1)),
            (b"GET http://x/ HTTP/1.1", Some(Detected::Http1)),
            (b"GE", None),
            (b"GET", None),
            (b"GET ", None),
            (H2_PREFACE, Some(Detected::Http2)),
            (&H2_PREFACE[..10], None),
            (b"PRI", None),
            (b"PRIX", None),
            (b"PRI*", Some(Detected::Opaque)),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Detected::Tls)),
            (&[0x16], None),
            (&[0x16, 0x01], Some(Detected::Opaque)),
            (b"SSH-2.0-OpenSSH", Some(Detected::Opaque)),
            (b"hello", Some(Detected::Opaque)),
            (b"G\x00", Some(Detected::Opaque)),
            (b"GET\t/", Some(Detected::Opaque)),
            (b"GET  /", Some(Detected::Opaque)),
            (b"A /", Some(Detected::Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Some(Detected::Opaque)),
            (b"", None),
        ] {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn sniffing_waits_across_reads_and_the_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"GE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"T /x HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        let got = sniff(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Detected::Http1);
        let _client = writer.await.unwrap();
        let mut replay = Prefixed::new(buf.freeze(), server);
        let mut line = vec![0u8; 8];
        replay.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET /x H");
    }

    #[tokio::test]
    async fn a_silent_client_times_out_and_a_closing_one_is_opaque() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let mut buf = BytesMut::new();
        let got = sniff(&mut server, &mut buf, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(got, Detected::Timeout);
        assert!(started.elapsed() >= Duration::from_millis(50));

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let got = sniff(&mut server, &mut BytesMut::new(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Detected::Opaque);
    }
}
