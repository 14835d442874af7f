//! The load generator and the bulk-stream pair. These run *inside* the lab's pods (the
//! harness copies this very binary to `/run/muon/bench/bin/muon-bench` and starts it with
//! `muonctl lab exec`), so the client's connections go through the pod's iptables capture
//! exactly as an app's would.
//!
//! - `load --rate R`: open loop. Request *i* is due at `t0 + i/R` whatever happened before;
//!   its latency is measured from that intended time, not from when it was actually written,
//!   so a stall delays every request queued behind it and shows up in the percentiles
//!   (coordinated omission corrected, as wrk2 does). Due times come from a pacing thread with
//!   a 1 µs timer slack, because tokio's timer wheel only has millisecond resolution.
//! - `load` without `--rate`: closed loop, each connection sends its next request as soon as
//!   the previous answer is in: the maximum throughput of the path.
//! - `bulk` / `bulk-server`: one TCP stream pushed as fast as possible, either direction.
//!
//! HTTP/1.1 keep-alive over a fixed set of connections. The client is deliberately small (one
//! write, one `httparse`, a read loop per request, no task per connection besides the worker):
//! on two cores every microsecond the generator spends is one the proxies do not get.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

/// A request that takes longer than this is counted as an error and its connection replaced.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last request is due, how long answers may still arrive.
const DRAIN: Duration = Duration::from_secs(5);
/// Longest stream a bulk server agrees to produce or consume.
const BULK_MAX: Duration = Duration::from_secs(120);
const BULK_CHUNK: usize = 64 * 1024;
/// Room for the response head plus a read of the body.
const READ_BUF: usize = 16 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Target `IP:PORT` (the harness passes addresses, so no resolver is involved).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Requests per second, open loop. Without it: closed loop (maximum throughput).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Keep-alive connections, all opened before the clock starts.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load at the same rate before measuring (not in the percentiles).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Expected body size; any other size is an error.
    #[arg(long)]
    pub expect_size: Option<usize>,
    /// Count the measured answers by the value of this response header (`x-pod`: which
    /// replica answered).
    #[arg(long)]
    pub count_header: Option<String>,
    /// Print the report as JSON (for the harness) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BulkArgs {
    /// The bulk server's `IP:PORT`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// `up`: this side sends; `down`: the server sends.
    #[arg(long, value_enum)]
    pub direction: BulkDirection,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BulkServerArgs {
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GetArgs {
    /// `IP:PORT` of an HTTP server (a sidecar's health port, say).
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, default_value = "/")]
    pub path: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkDirection {
    Up,
    Down,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What one `load` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// "open" or "closed".
    pub mode: String,
    pub target: String,
    /// Requested rate (open loop).
    pub rate: Option<f64>,
    pub connections: usize,
    /// gRPC: calls in flight at most, spread over the connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
    pub warmup_s: f64,
    /// The measured window.
    pub duration_s: f64,
    /// Answers counted in the percentiles.
    pub requests: u64,
    /// Every answer, warm-up included (what the proxies' CPU time is divided by).
    pub total_requests: u64,
    pub errors: u64,
    /// Open loop: requests that were due but never answered before the drain deadline.
    pub unsent: u64,
    pub achieved_rps: f64,
    pub latency_us: Percentiles,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// `--count-header`: measured answers by the header's value ("" when it was missing).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub answered_by: BTreeMap<String, u64>,
    /// The latency histogram, (nanoseconds, count) per non-empty bucket, so the harness can
    /// merge rounds exactly. Dropped from the run's results once merged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub histogram_ns: Vec<(u64, u64)>,
}

impl LoadReport {
    /// Adds another round of the same step: counts add up, percentiles come from the merged
    /// histogram (never from averaging percentiles).
    pub fn merge(&mut self, other: &LoadReport) -> Result<()> {
        let mut h = histogram_from(&self.histogram_ns)?;
        h.add(histogram_from(&other.histogram_ns)?)
            .context("merging histograms")?;
        self.histogram_ns = histogram_pairs(&h);
        self.latency_us = percentiles(&h);
        self.duration_s += other.duration_s;
        self.warmup_s += other.warmup_s;
        self.requests += other.requests;
        self.total_requests += other.total_requests;
        self.errors += other.errors;
        self.unsent += other.unsent;
        self.achieved_rps = self.requests as f64 / self.duration_s.max(1e-9);
        if self.first_error.is_none() {
            self.first_error = other.first_error.clone();
        }
        for (k, n) in &other.answered_by {
            *self.answered_by.entry(k.clone()).or_default() += n;
        }
        Ok(())
    }
}

impl BulkReport {
    pub fn merge(&mut self, other: &BulkReport) {
        self.bytes += other.bytes;
        self.seconds += other.seconds;
        self.mb_per_s = self.bytes as f64 / self.seconds.max(1e-9) / 1e6;
    }
}

fn new_histogram() -> Result<Histogram<u64>> {
    // Nanoseconds, 1 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).context("histogram bounds")
}

fn histogram_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn histogram_from(pairs: &[(u64, u64)]) -> Result<Histogram<u64>> {
    let mut h = new_histogram()?;
    for &(v, n) in pairs {
        h.saturating_record_n(v, n);
    }
    Ok(h)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BulkReport {
    pub direction: Option<BulkDirection>,
    pub bytes: u64,
    pub seconds: f64,
    /// 10^6 bytes per second, counted where the bytes arrived.
    pub mb_per_s: f64,
}

/// A load's duration: the mesh's one grammar (`10s`, `500ms`, `1m`), at most an hour.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match muon_core::duration::parse_flag(s)? {
        d if d > Duration::from_secs(3600) => Err(format!("{s:?}: must be at most 1h")),
        d => Ok(d),
    }
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub fn run_load(args: &LoadArgs) -> Result<()> {
    if args.connections == 0 || args.connections > 10_000 {
        bail!("--connections must be 1..=10000");
    }
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate <= 1_000_000.0) {
            bail!("--rate must be in (0, 1000000]");
        }
    }
    let report = runtime()?.block_on(load(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let l = &report.latency_us;
        println!(
            "{} loop to {}: {} answers in {:.1}s ({:.0}/s), {} errors, {} unsent\nlatency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            report.mode, report.target, report.requests, report.duration_s, report.achieved_rps,
            report.errors, report.unsent, l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
    Ok(())
}

pub fn run_bulk(args: &BulkArgs) -> Result<()> {
    let report = runtime()?.block_on(bulk(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:?}: {} bytes in {:.2}s = {:.1} MB/s",
            args.direction, report.bytes, report.seconds, report.mb_per_s
        );
    }
    Ok(())
}

/// One HTTP/1.0 GET (so the answer is never chunked); prints the body of a 200 answer.
pub fn run_get(args: &GetArgs) -> Result<()> {
    let body = runtime()?.block_on(async {
        let mut s = open(args.addr).await?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: muon-bench\r\n\r\n",
            args.path, args.addr
        );
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut answer))
            .await
            .context("the answer did not end in time")??;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&answer).context("parsing the answer")? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => bail!("incomplete answer"),
        };
        if resp.code != Some(200) {
            bail!("GET {}: status {:?}", args.path, resp.code);
        }
        Ok::<_, anyhow::Error>(answer[head..].to_vec())
    })?;
    use std::io::Write;
    std::io::stdout().write_all(&body)?;
    Ok(())
}

pub fn run_bulk_server(args: &BulkServerArgs) -> Result<()> {
    runtime()?.block_on(bulk_server(args.port))
}

/// Per-worker tallies, merged at the end (no shared state on the request path).
struct Tally {
    hist: Histogram<u64>,
    measured: u64,
    total: u64,
    errors: u64,
    first_error: Option<String>,
    answered_by: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Result<Tally> {
        let hist = new_histogram()?;
        Ok(Tally {
            hist,
            measured: 0,
            total: 0,
            errors: 0,
            first_error: None,
            answered_by: BTreeMap::new(),
        })
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.measured += other.measured;
        self.total += other.total;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (k, n) in other.answered_by {
            *self.answered_by.entry(k).or_default() += n;
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let us = |ns: u64| ns as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        mean: h.mean() / 1000.0,
        p50: us(h.value_at_quantile(0.50)),
        p90: us(h.value_at_quantile(0.90)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
    }
}

async fn load(args: &LoadArgs) -> Result<LoadReport> {
    let host = args.addr.to_string();
    let request: Arc<[u8]> = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: muon-bench\r\n\r\n",
        args.path
    )
    .into_bytes()
    .into();
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(
            Conn::connect(args.addr, request.clone(), args.expect_size)
                .await
                .map(|c| c.counting(args.count_header.as_deref()))
                .with_context(|| format!("connecting to {}", args.addr))?,
        );
    }
    // Every connection has answered once before the clock starts (no handshake in the figures).
    for c in &mut conns {
        c.request()
            .await
            .with_context(|| format!("first request to {}", args.addr))?;
    }
    let shape = Shape {
        target: args.addr.to_string(),
        rate: args.rate,
        connections: args.connections,
        streams: None,
        warmup: args.warmup,
        duration: args.duration,
    };
    drive(conns, shape).await
}

/// One request at a time, as a worker of the generator: an HTTP/1.1 connection, or one
/// caller on a shared HTTP/2 connection (`grpc`).
pub(super) trait Caller: Send + 'static {
    /// One request and its whole answer; an error means the caller must reconnect.
    fn call(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Replaces a broken connection; on failure the next call fails fast and tries again.
    fn reconnect(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// Counts the last answer as measured (`--count-header`).
    fn count_last(&mut self) {}
    /// The measured answers by the counted header's value.
    fn counted(&mut self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

impl Caller for Conn {
    async fn call(&mut self) -> Result<()> {
        self.request().await
    }

    async fn reconnect(&mut self) {
        Conn::reconnect(self).await
    }

    fn count_last(&mut self) {
        if let Some(c) = self.last.and_then(|i| self.seen.get_mut(i)) {
            c.1 += 1;
        }
    }

    fn counted(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.seen)
    }
}

/// What a load run is, for its report.
pub(super) struct Shape {
    pub target: String,
    pub rate: Option<f64>,
    pub connections: usize,
    pub streams: Option<usize>,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Runs the open loop (with a rate) or the closed loop over ready callers, one worker each.
pub(super) async fn drive<C: Caller>(callers: Vec<C>, shape: Shape) -> Result<LoadReport> {
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + shape.warmup;
    let end = measure_from + shape.duration;
    let mut workers = tokio::task::JoinSet::new();
    let mut pacer = None;
    match shape.rate {
        Some(rate) => {
            let total = ((shape.warmup + shape.duration).as_secs_f64() * rate).round() as u64;
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(Mutex::new(rx));
            pacer = Some((
                total,
                std::thread::spawn(move || pace(tx, start, rate, total)),
            ));
            let hard_stop = end + DRAIN;
            for c in callers {
                workers.spawn(open_worker(c, rx.clone(), measure_from, hard_stop));
            }
        }
        None => {
            for c in callers {
                workers.spawn(closed_worker(c, start, measure_from, end));
            }
        }
    }
    let mut tally = Tally::new()?;
    while let Some(done) = workers.join_next().await {
        tally.merge(done.context("a load worker panicked")??);
    }
    let unsent = match pacer {
        Some((total, handle)) => {
            let _ = handle.join();
            total.saturating_sub(tally.total + tally.errors)
        }
        None => 0,
    };
    let duration_s = shape.duration.as_secs_f64();
    Ok(LoadReport {
        mode: if shape.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        target: shape.target,
        rate: shape.rate,
        connections: shape.connections,
        streams: shape.streams,
        warmup_s: shape.warmup.as_secs_f64(),
        duration_s,
        requests: tally.measured,
        total_requests: tally.total,
        errors: tally.errors,
        unsent,
        achieved_rps: tally.measured as f64 / duration_s.max(1e-9),
        latency_us: percentiles(&tally.hist),
        first_error: tally.first_error,
        answered_by: tally.answered_by,
        histogram_ns: histogram_pairs(&tally.hist),
    })
}

/// Releases request `i` at `start + i/rate`, from a plain thread: nanosleep with a 1 µs timer
/// slack wakes within a few microseconds, where tokio's timer would round up to 1 ms.
/// When it wakes late, every request already due is released at once.
fn pace(tx: mpsc::UnboundedSender<Instant>, start: Instant, rate: f64, total: u64) {
    let _ = nix::sys::prctl::set_timerslack(1);
    let interval = 1.0 / rate;
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if tx.send(due).is_err() {
            return;
        }
    }
}

/// Takes the next due request from the shared queue (whichever connection is free first),
/// and records its latency from the time it was due.
async fn open_worker<C: Caller>(
    mut conn: C,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    measure_from: Instant,
    hard_stop: Instant,
) -> Result<Tally> {
    let mut tally = Tally::new()?;
    let hard_stop_tokio = tokio::time::Instant::from_std(hard_stop);
    loop {
        let next =
            tokio::time::timeout_at(hard_stop_tokio, async { queue.lock().await.recv().await })
                .await;
        let due = match next {
            Ok(Some(due)) => due,
            // Closed and empty (every request handed out), or past the drain deadline.
            Ok(None) | Err(_) => break,
        };
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        match tokio::time::timeout_at(deadline.min(hard_stop_tokio), conn.call()).await {
            Ok(Ok(())) => {
                tally.total += 1;
                if due >= measure_from {
                    tally.measured += 1;
                    tally.hist.saturating_record(ns(due.elapsed()));
                    conn.count_last();
                }
            }
            Ok(Err(e)) => {
                tally.error(format!("{e:#}"));
                conn.reconnect().await;
            }
            Err(_) => {
                tally.error("request timed out");
                conn.reconnect().await;
            }
        }
    }
    tally.answered_by.extend(conn.counted());
    Ok(tally)
}

async fn closed_worker<C: Caller>(
    mut conn: C,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Result<Tally> {
    let mut tally = Tally::new()?;
    tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, conn.call()).await {
            Ok(Ok(())) => {
                tally.total += 1;
                if sent >= measure_from {
                    tally.measured += 1;
                    tally.hist.saturating_record(ns(sent.elapsed()));
                    conn.count_last();
                }
            }
            Ok(Err(e)) => {
                tally.error(format!("{e:#}"));
                conn.reconnect().await;
            }
            Err(_) => {
                tally.error("request timed out");
                conn.reconnect().await;
            }
        }
    }
    tally.answered_by.extend(conn.counted());
    Ok(tally)
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// One keep-alive HTTP/1.1 connection: a request is one write of fixed bytes, and the answer
/// is read until its `content-length` body is complete.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    request: Arc<[u8]>,
    expect_size: Option<usize>,
    buf: Box<[u8]>,
    /// `--count-header`: the header, the values seen with their measured counts, and the
    /// last answer's value (an index into `seen`).
    count_header: Option<Box<str>>,
    seen: Vec<(String, u64)>,
    last: Option<usize>,
}

impl Conn {
    async fn connect(
        addr: SocketAddr,
        request: Arc<[u8]>,
        expect_size: Option<usize>,
    ) -> Result<Conn> {
        let mut c = Conn {
            addr,
            stream: None,
            request,
            expect_size,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            count_header: None,
            seen: Vec::new(),
            last: None,
        };
        c.stream = Some(open(addr).await?);
        Ok(c)
    }

    fn counting(mut self, header: Option<&str>) -> Conn {
        self.count_header = header.map(Into::into);
        self
    }

    /// Replaces a broken connection; on failure the next request fails fast and tries again.
    async fn reconnect(&mut self) {
        self.stream = tokio::time::timeout(REQUEST_TIMEOUT, open(self.addr))
            .await
            .ok()
            .and_then(|r| r.ok());
        if self.stream.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn request(&mut self) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            bail!("not connected to {}", self.addr);
        };
        stream
            .write_all(&self.request)
            .await
            .context("writing the request")?;
        let mut filled = 0;
        let (head_len, body_len) = loop {
            if filled == self.buf.len() {
                bail!("response head larger than {READ_BUF} bytes");
            }
            let n = stream
                .read(&mut self.buf[filled..])
                .await
                .context("reading the response")?;
            if n == 0 {
                bail!("connection closed before the response was complete");
            }
            filled += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp
                .parse(&self.buf[..filled])
                .context("parsing the response")?
            {
                httparse::Status::Partial => continue,
                httparse::Status::Complete(head_len) => {
                    if resp.code != Some(200) {
                        bail!("status {:?}", resp.code);
                    }
                    if let Some(name) = &self.count_header {
                        let value = resp
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map_or(&b""[..], |h| h.value);
                        self.last = Some(
                            match self.seen.iter().position(|(v, _)| v.as_bytes() == value) {
                                Some(i) => i,
                                None => {
                                    let v = String::from_utf8_lossy(value).into_owned();
                                    self.seen.push((v, 0));
                                    self.seen.len() - 1
                                }
                            },
                        );
                    }
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| {
                            std::str::from_utf8(h.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        })
                        .context(
                            "response without content-length (chunked answers are not supported)",
                        )?;
                    break (head_len, len);
                }
            }
        };
        if let Some(want) = self.expect_size {
            if body_len != want {
                bail!("body of {body_len} bytes, expected {want}");
            }
        }
        let mut body = filled - head_len;
        while body < body_len {
            let n = stream
                .read(&mut self.buf)
                .await
                .context("reading the body")?;
            if n == 0 {
                bail!("connection closed in the body");
            }
            body += n;
        }
        if body > body_len {
            bail!(
                "{} bytes after the body (the client never pipelines)",
                body - body_len
            );
        }
        Ok(())
    }
}

pub(super) async fn open(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The bulk protocol: the client sends one byte (`U` it sends, `D` the server sends) and the
/// duration in milliseconds (u64, big endian). For `U` the server counts until EOF and answers
/// with the count (u64); for `D` it sends for the duration and closes.
async fn bulk(args: &BulkArgs) -> Result<BulkReport> {
    let mut s = open(args.addr).await?;
    let ms = u64::try_from(args.duration.as_millis()).unwrap_or(u64::MAX);
    let mut head = [0u8; 9];
    head[0] = if args.direction == BulkDirection::Up {
        b'U'
    } else {
        b'D'
    };
    head[1..].copy_from_slice(&ms.to_be_bytes());
    let start = Instant::now();
    s.write_all(&head).await?;
    let limit = args.duration + Duration::from_secs(15);
    let bytes = match args.direction {
        BulkDirection::Down => tokio::time::timeout(limit, drain_stream(&mut s))
            .await
            .context("the server did not finish sending in time")??,
        BulkDirection::Up => {
            let chunk = vec![0x5au8; BULK_CHUNK];
            let end = start + args.duration;
            while Instant::now() < end {
                s.write_all(&chunk).await.context("sending")?;
            }
            s.shutdown().await?;
            let mut count = [0u8; 8];
            tokio::time::timeout(limit, s.read_exact(&mut count))
                .await
                .context("the server did not report its count in time")??;
            u64::from_be_bytes(count)
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(BulkReport {
        direction: Some(args.direction),
        bytes,
        seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
    })
}

async fn drain_stream(s: &mut TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await.context("receiving")?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

async fn bulk_server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .with_context(|| format!("binding port {port}"))?;
    eprintln!("bulk server listening on {}", listener.local_addr()?);
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve_bulk(&mut s).await {
                eprintln!("bulk: {e:#}");
            }
        });
    }
}

async fn serve_bulk(s: &mut TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&head[1..]);
    let duration = Duration::from_millis(u64::from_be_bytes(ms)).min(BULK_MAX);
    match head[0] {
        b'D' => {
            let chunk = vec![0xa5u8; BULK_CHUNK];
            let end = Instant::now() + duration;
            while Instant::now() < end {
                s.write_all(&chunk).await?;
            }
            s.shutdown().await?;
        }
        b'U' => {
            let total = tokio::time::timeout(duration + Duration::from_secs(15), drain_stream(s))
                .await
                .context("the client kept sending past its duration")??;
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await?;
        }
        other => bail!("unknown bulk mode {other:#x}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_fractions() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn open_loop_latency_counts_from_the_due_time_not_the_send_time() {
        // A server that stalls once for 200 ms: in an open loop every request due during the
        // stall waits behind it, so far more than one answer is slow.
        let rt = runtime().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let mut n_req = 0;
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    n_req += 1;
                    if n_req == 20 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            });
            let args = LoadArgs {
                addr,
                path: "/".into(),
                rate: Some(200.0),
                connections: 1,
                duration: Duration::from_secs(1),
                warmup: Duration::ZERO,
                expect_size: Some(2),
                count_header: None,
                json: true,
            };
            let r = load(&args).await.unwrap();
            assert_eq!(r.errors, 0, "{:?}", r.first_error);
            assert_eq!(r.requests, 200);
            // ~40 requests were due during the stall: p90 sees it, not only the max.
            assert!(r.latency_us.p90 > 20_000.0, "{:?}", r.latency_us);
            assert!(r.latency_us.max >= 150_000.0, "{:?}", r.latency_us);
        });
    }

    #[test]
    fn answers_are_counted_by_the_header_in_the_measured_window() {
        // Every fourth answer says `x-pod: b`, the rest `a`; one says nothing.
        let rt = runtime().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                for i in 0u32.. {
                    if s.read(&mut buf).await.unwrap() == 0 {
                        return;
                    }
                    let pod = match i {
                        7 => String::new(),
                        i if i % 4 == 0 => "x-pod: b\r\n".into(),
                        _ => "X-Pod: a\r\n".into(),
                    };
                    let answer = format!("HTTP/1.1 200 OK\r\n{pod}content-length: 2\r\n\r\nok");
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
            });
            let args = LoadArgs {
                addr,
                path: "/".into(),
                rate: None,
                connections: 1,
                duration: Duration::from_millis(300),
                warmup: Duration::ZERO,
                expect_size: Some(2),
                count_header: Some("x-pod".into()),
                json: true,
            };
            let r = load(&args).await.unwrap();
            assert_eq!(r.errors, 0, "{:?}", r.first_error);
            // The first request (before the clock) is not counted; every measured one is.
            assert_eq!(r.answered_by.values().sum::<u64>(), r.requests);
            assert_eq!(r.answered_by.get(""), Some(&1), "{:?}", r.answered_by);
            let (a, b) = (r.answered_by["a"], r.answered_by["b"]);
            assert!(a > 2 * b && b > 0, "{:?}", r.answered_by);
        });
    }

    #[test]
    fn merged_rounds_take_percentiles_from_the_combined_histogram() {
        let round = |values: &[u64]| {
            let mut h = new_histogram().unwrap();
            values.iter().for_each(|&v| h.record(v).unwrap());
            LoadReport {
                requests: values.len() as u64,
                total_requests: values.len() as u64,
                duration_s: 1.0,
                latency_us: percentiles(&h),
                histogram_ns: histogram_pairs(&h),
                ..Default::default()
            }
        };
        // 99 fast answers in one round, one slow one in the other: p99.9 of the merge is the
        // slow one, which no average of the two rounds' percentiles would give.
        let mut a = round(&[100_000; 99]);
        a.merge(&round(&[50_000_000])).unwrap();
        assert_eq!(a.requests, 100);
        assert_eq!(a.achieved_rps, 50.0);
        assert!((a.latency_us.p50 - 100.0).abs() < 1.0, "{:?}", a.latency_us);
        assert!(a.latency_us.p999 > 49_000.0, "{:?}", a.latency_us);
    }

    #[test]
    fn bulk_down_and_up_count_the_bytes_that_arrived() {
        let rt = runtime().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move { serve_bulk(&mut s).await.unwrap() });
                }
            });
            for direction in [BulkDirection::Down, BulkDirection::Up] {
                let args = BulkArgs {
                    addr,
                    direction,
                    duration: Duration::from_millis(200),
                    json: true,
                };
                let r = bulk(&args).await.unwrap();
                assert!(r.bytes > BULK_CHUNK as u64, "{direction:?}: {r:?}");
                assert!(r.mb_per_s > 0.0);
            }
        });
    }
}
