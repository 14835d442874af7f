//! The per-connection path over real loopback sockets: `outbound::handle`,
//! `inbound::handle`, `listen::admit_to` and `listen::connection`, with the original
//! destination given directly (capture itself is tested in `binary.rs` and in the lab).

use arc_swap::ArcSwapOption;
use clap::Parser;
use muon_core::ServiceTable;
use muon_proxy::accesslog::Record;
use muon_proxy::config::{Args, Config};
use muon_proxy::drain::Drain;
use muon_proxy::metrics::Metrics;
use muon_proxy::table::Table;
use muon_proxy::{inbound, listen, outbound, Direction, Outcome, Shared};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

const VIP: &str = "198.19.0.1:80";

fn config(extra: &[&str]) -> Config {
    let argv = ["muon-proxy", "--connect-timeout", "2s"]
        .into_iter()
        .chain(extra.iter().copied());
    Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
}

/// A table with one service `web.shop` at [`VIP`] whose endpoints are `(ip, pod)`.
fn table(target_port: u16, endpoints: &[(&str, &str)]) -> ServiceTable {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(ip, pod)| format!(r#"{{"ip":"{ip}","pod":"{pod}"}}"#))
        .collect();
    let json = format!(
        r#"{{"services":[{{"name":"web","namespace":"shop","vips":["198.19.0.1"],
            "ports":[{{"port":80,"targetPort":{target_port}}}],"endpoints":[{}],
            "traffic":{{"loadBalancer":{{"algorithm":"RoundRobin"}}}}}}]}}"#,
        endpoints.join(",")
    );
    ServiceTable::from_json(json.as_bytes()).unwrap()
}

fn shared(config: &Config, table: ServiceTable) -> Arc<Shared> {
    let routes = Arc::new(ArcSwapOption::from_pointee(Table::from_service_table(
        &table,
    )));
    Arc::new(Shared::new(config, routes, Arc::new(Metrics::new())))
}

/// A connected pair: the app's end and the proxy's accepted end.
async fn accepted_pair() -> (TcpStream, TcpStream, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, src) = l.accept().await.unwrap();
    (client, server, src)
}

/// Runs `handle` for one connection in a task; returns the app's end and the result.
fn spawn_proxy(
    shared: Arc<Shared>,
    direction: Direction,
    server: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
) -> tokio::task::JoinHandle<(Outcome, Record)> {
    tokio::spawn(async move {
        let mut rec = Record::new(direction, src, dst);
        let outcome = match direction {
            Direction::Outbound => outbound::handle(&shared, server, &mut rec).await,
            Direction::Inbound => inbound::handle(&shared, server, &mut rec).await,
            Direction::Gateway => unreachable!("no gateway in these tests"),
        };
        (outcome, rec)
    })
}

/// A server that reads its request to EOF, then answers `reply:<n>` (n = bytes read) in
/// two writes a little apart, then closes. Returns its address and the peers it saw.
async fn reply_after_eof(addr: &str) -> (SocketAddr, tokio::sync::mpsc::Receiver<SocketAddr>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let local = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = tx.send(peer).await;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(b"reply:").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.write_all(buf.len().to_string().as_bytes()).await.unwrap();
            });
        }
    });
    (local, rx)
}

/// Sends `req`, half-closes, and reads the whole answer.
async fn request(client: &mut TcpStream, req: &[u8]) -> String {
    client.write_all(req).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = String::new();
    timeout(Duration::from_secs(5), client.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn free_port_closed() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn outbound_half_close_still_delivers_the_reply_and_counts_bytes() {
    let (backend, _) = reply_after_eof("127.0.0.1:0").await;
    let cfg = config(&[]);
    let shared = shared(&cfg, table(backend.port(), &[("127.0.0.1", "web-0")]));
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(
        shared.clone(),
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );

    assert_eq!(request(&mut client, b"hello").await, "reply:5");
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::Ok);
    assert_eq!((rec.bytes_sent, rec.bytes_received), (5, 7));
    assert_eq!(rec.service.as_deref(), Some("web.shop"));
    assert_eq!(rec.endpoint, Some(backend));
    assert_eq!(rec.pod.as_deref(), Some("web-0"));
    let m = shared.metrics.direction(Direction::Outbound);
    assert_eq!((m.sent.get(), m.received.get()), (5, 7));
}

/// A server that is done first: on accept it sends a banner and shuts down its write side at
/// once, then keeps reading until the client's EOF. Sends what it read on the channel.
async fn banner_then_read() -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                w.write_all(b"banner").await.unwrap();
                w.shutdown().await.unwrap();
                let mut heard = Vec::new();
                r.read_to_end(&mut heard).await.unwrap();
                let _ = tx.send(heard).await;
            });
        }
    });
    (local, rx)
}

/// One connection through the proxy to a [`banner_then_read`] server: the server's EOF
/// reaches the client, and what the client sends after it still reaches the server.
async fn server_closes_first(
    shared: &Arc<Shared>,
    direction: Direction,
    dst: SocketAddr,
    heard: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    let (client, server, src) = accepted_pair().await;
    let task = spawn_proxy(shared.clone(), direction, server, src, dst);
    let (mut r, mut w) = client.into_split();
    w.write_all(b"early ").await.unwrap();
    let mut got = Vec::new();
    timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .expect("the server's EOF reaches the client")
        .unwrap();
    assert_eq!(got, b"banner", "{direction:?}");
    // The client has seen the server's EOF and goes on sending.
    w.write_all(b"and late").await.unwrap();
    w.shutdown().await.unwrap();
    let heard = timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the client's later bytes and EOF reach the server")
        .unwrap();
    assert_eq!(heard, b"early and late", "{direction:?}");
    let (outcome, rec) = timeout(Duration::from_secs(10), task)
        .await
        .expect("the relay ends once both sides are done")
        .unwrap();
    assert_eq!(outcome, Outcome::Ok, "{direction:?}");
    assert_eq!(
        (rec.bytes_sent, rec.bytes_received),
        (14, 6),
        "{direction:?}"
    );
}

#[tokio::test]
async fn server_half_close_first_still_carries_what_the_client_sends_after_it() {
    let (backend, mut heard) = banner_then_read().await;
    // Declared `tcp` (straight to the opaque relay) and undeclared (detected as not HTTP
    // from the client's first bytes, then the same relay).
    for protocol in [r#","protocol":"tcp""#, ""] {
        let json = format!(
            r#"{{"services":[{{"name":"web","namespace":"shop","vips":["198.19.0.1"],
                "ports":[{{"port":80,"targetPort":{}{protocol}}}],
                "endpoints":[{{"ip":"127.0.0.1","pod":"web-0"}}]}}]}}"#,
            backend.port()
        );
        let table = ServiceTable::from_json(json.as_bytes()).unwrap();
        let shared = shared(&config(&[]), table);
        server_closes_first(
            &shared,
            Direction::Outbound,
            VIP.parse().unwrap(),
            &mut heard,
        )
        .await;
    }
    let shared = shared(&config(&[]), ServiceTable::default());
    server_closes_first(&shared, Direction::Inbound, backend, &mut heard).await;
}

#[tokio::test]
async fn large_transfers_are_counted_exactly_both_ways() {
    // An echo server: every byte comes back.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });
    let cfg = config(&[]);
    let shared = shared(&cfg, table(backend.port(), &[("127.0.0.1", "echo-0")]));
    let (client, server, src) = accepted_pair().await;
    let task = spawn_proxy(
        shared,
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );

    const LEN: usize = 3 * 1024 * 1024 + 17;
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut left = LEN;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), LEN);
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::Ok);
    assert_eq!(
        (rec.bytes_sent, rec.bytes_received),
        (LEN as u64, LEN as u64)
    );
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_idle_timeout_but_traffic_keeps_it_open() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        // Hold the connection, read and drop whatever arrives, never answer.
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 64];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
    });
    let cfg = config(&["--idle-timeout", "300ms"]);
    let shared = shared(&cfg, table(backend.port(), &[("127.0.0.1", "web-0")]));
    let (mut client, server, src) = accepted_pair().await;
    let start = Instant::now();
    let task = spawn_proxy(
        shared,
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );

    // A byte every 100ms for 600ms: twice the idle timeout, but never idle.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b".").await.unwrap();
    }
    assert!(!task.is_finished(), "closed although bytes kept moving");
    let (outcome, rec) = timeout(Duration::from_secs(3), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::IdleTimeout);
    assert_eq!(rec.bytes_sent, 6);
    assert!(start.elapsed() >= Duration::from_millis(900));
    let mut buf = [0u8; 1];
    assert_eq!(
        client.read(&mut buf).await.unwrap_or(0),
        0,
        "client sees the close"
    );
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_and_closes_the_client() {
    let closed = free_port_closed();
    let cfg = config(&[]);
    let shared = shared(&cfg, table(closed.port(), &[("127.0.0.1", "web-0")]));
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(
        shared.clone(),
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::ConnectError);
    assert_eq!(rec.endpoint, None);
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
}

#[tokio::test]
async fn full_backlog_is_a_connect_timeout() {
    // Backlog 0 holds one pending connection; the kernel drops SYNs beyond it.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let full = sock.local_addr().unwrap().as_socket().unwrap();
    let _filler = std::net::TcpStream::connect(full).unwrap();

    let cfg = config(&["--connect-timeout", "300ms"]);
    let shared = shared(&cfg, table(full.port(), &[("127.0.0.1", "web-0")]));
    let (_client, server, src) = accepted_pair().await;
    let start = Instant::now();
    let task = spawn_proxy(
        shared,
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );
    let (outcome, _) = task.await.unwrap();
    assert_eq!(outcome, Outcome::ConnectTimeout);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

/// Binds `127.0.0.1:p` and `[::1]:p` on one free port `p`.
async fn dual_stack_port() -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let v4 = listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = listen::bind(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port))) {
            return (v4, v6);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// Accepts forever, answering each connection with `name` and closing.
fn answer_with(l: TcpListener, name: &'static str) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(name.as_bytes()).await;
        }
    });
}

async fn who_answers(shared: &Arc<Shared>) -> (String, Record) {
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(
        shared.clone(),
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );
    let got = request(&mut client, b"").await;
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::Ok);
    (got, rec)
}

#[tokio::test]
async fn round_robin_alternates_between_endpoints() {
    let (v4, v6) = dual_stack_port().await;
    let port = v4.local_addr().unwrap().port();
    answer_with(v4, "v4");
    answer_with(v6, "v6");
    let cfg = config(&[]);
    let shared = shared(&cfg, table(port, &[("127.0.0.1", "a"), ("::1", "b")]));
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (got, rec) = who_answers(&shared).await;
        seen.push(format!("{got}/{}", rec.pod.as_deref().unwrap_or("")));
    }
    assert_eq!(seen, ["v4/a", "v6/b", "v4/a", "v6/b"]);
}

#[tokio::test]
async fn endpoint_that_refuses_is_skipped() {
    // ::1 has nothing on the port, so every connection must land on 127.0.0.1.
    let (v4, v6) = dual_stack_port().await;
    let port = v4.local_addr().unwrap().port();
    drop(v6);
    answer_with(v4, "v4");
    let cfg = config(&[]);
    let shared = shared(&cfg, table(port, &[("::1", "dead"), ("127.0.0.1", "live")]));
    for _ in 0..3 {
        let (got, rec) = who_answers(&shared).await;
        assert_eq!(got, "v4");
        assert_eq!(rec.pod.as_deref(), Some("live"));
        assert_eq!(rec.endpoint, Some(SocketAddr::from(([127, 0, 0, 1], port))));
    }
}

#[tokio::test]
async fn unknown_destination_passes_through_to_the_original_destination() {
    let (backend, _) = reply_after_eof("127.0.0.1:0").await;
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(shared, Direction::Outbound, server, src, backend);
    assert_eq!(request(&mut client, b"abc").await, "reply:3");
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::Ok);
    assert_eq!(rec.service, None);
    assert_eq!(rec.endpoint, Some(backend));
}

#[tokio::test]
async fn service_without_endpoints_closes_the_client() {
    let cfg = config(&[]);
    let shared = shared(&cfg, table(8080, &[]));
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(
        shared,
        Direction::Outbound,
        server,
        src,
        VIP.parse().unwrap(),
    );
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::NoEndpoints);
    assert_eq!(rec.service.as_deref(), Some("web.shop"));
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
}

#[tokio::test]
async fn inbound_reaches_the_app_from_127_0_0_6() {
    let (app, mut peers) = reply_after_eof("127.0.0.1:0").await;
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    let (mut client, server, src) = accepted_pair().await;
    let task = spawn_proxy(shared.clone(), Direction::Inbound, server, src, app);
    assert_eq!(request(&mut client, b"hi").await, "reply:2");
    let (outcome, rec) = task.await.unwrap();
    assert_eq!(outcome, Outcome::Ok);
    assert_eq!(rec.endpoint, Some(app));
    let peer = peers.recv().await.unwrap();
    assert_eq!(peer.ip(), muon_core::ports::INBOUND_SOURCE_V4);
    let m = shared.metrics.direction(Direction::Inbound);
    assert_eq!((m.sent.get(), m.received.get()), (2, 7));
}

#[tokio::test]
async fn inbound_ipv6_falls_back_when_6_is_not_on_lo() {
    // The host's lo has no ::6 (only muon-init adds it, inside pods): the proxy must warn
    // once and still connect.
    let (app, mut peers) = reply_after_eof("[::1]:0").await;
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    for _ in 0..2 {
        let (mut client, server, src) = accepted_pair().await;
        let task = spawn_proxy(shared.clone(), Direction::Inbound, server, src, app);
        assert_eq!(request(&mut client, b"six").await, "reply:3");
        assert_eq!(task.await.unwrap().0, Outcome::Ok);
        let peer = peers.recv().await.unwrap();
        assert!(peer.is_ipv6());
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_are_shed_as_overloaded() {
    let (backend, _) = reply_after_eof("127.0.0.1:0").await;
    let cfg = config(&["--max-connections", "1"]);
    let shared = shared(&cfg, ServiceTable::default());
    let (_c1, s1, src1) = accepted_pair().await;
    let (mut c2, s2, src2) = accepted_pair().await;
    let local1 = s1.local_addr().unwrap();
    let local2 = s2.local_addr().unwrap();

    let first = listen::admit_to(&shared, Direction::Outbound, s1, src1, local1, backend);
    assert!(first.is_some());
    let second = listen::admit_to(&shared, Direction::Outbound, s2, src2, local2, backend);
    assert!(second.is_none());
    let mut buf = [0u8; 1];
    assert_eq!(
        c2.read(&mut buf).await.unwrap_or(0),
        0,
        "shed client is closed"
    );

    let text = shared.metrics.encode();
    for want in [
        r#"muon_tcp_connections_opened_total{direction="outbound"} 2"#,
        r#"muon_tcp_connections_open{direction="outbound"} 1"#,
        r#"muon_tcp_connections_closed_total{direction="outbound",outcome="overloaded"} 1"#,
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    drop(first);
    assert!(shared
        .metrics
        .encode()
        .contains(r#"muon_tcp_connections_open{direction="outbound"} 0"#));
    // The slot is free again.
    let (_c3, s3, src3) = accepted_pair().await;
    let local3 = s3.local_addr().unwrap();
    assert!(listen::admit_to(&shared, Direction::Outbound, s3, src3, local3, backend).is_some());
}

#[tokio::test]
async fn direct_connection_to_the_listener_is_refused_as_a_loop() {
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    let (mut client, server, src) = accepted_pair().await;
    let local = server.local_addr().unwrap();
    assert!(listen::admit_to(&shared, Direction::Inbound, server, src, local, local).is_none());
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
    assert!(shared
        .metrics
        .encode()
        .contains(r#"muon_tcp_connections_closed_total{direction="inbound",outcome="loop"} 1"#));
}

#[tokio::test]
async fn drain_deadline_cuts_a_connection_that_is_still_open() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 64];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
    });
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    let drain = Drain::new();
    let (mut client, server, src) = accepted_pair().await;
    let local = server.local_addr().unwrap();
    let conn = listen::admit_to(&shared, Direction::Outbound, server, src, local, backend).unwrap();
    let task = tokio::spawn(listen::connection(shared.clone(), conn, drain.watch()));
    client.write_all(b"still here").await.unwrap();

    // Draining alone leaves open connections alone...
    drain.start();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished());
    // ...the deadline cuts them.
    drain.close();
    timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
    let text = shared.metrics.encode();
    assert!(
        text.contains(
            r#"muon_tcp_connections_closed_total{direction="outbound",outcome="drain_timeout"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"muon_tcp_bytes_total{direction="outbound",flow="sent"} 10"#));
}

#[tokio::test]
async fn aborted_connection_task_still_writes_its_access_event() {
    // At the drain deadline a listener aborts connection tasks that did not get to run within
    // the close grace (a busy host). The aborted connection must still be counted and logged.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 64];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
    });
    let cfg = config(&[]);
    let shared = shared(&cfg, ServiceTable::default());
    let drain = Drain::new();
    let (mut client, server, src) = accepted_pair().await;
    let local = server.local_addr().unwrap();
    let conn = listen::admit_to(&shared, Direction::Outbound, server, src, local, backend).unwrap();
    let task = tokio::spawn(listen::connection(shared.clone(), conn, drain.watch()));
    client.write_all(b"open").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let text = shared.metrics.encode();
    for want in [
        r#"muon_tcp_connections_closed_total{direction="outbound",outcome="drain_timeout"} 1"#,
        r#"muon_tcp_connections_open{direction="outbound"} 0"#,
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
}
