//! Connections to one upstream (an endpoint, or the local app), shared by every request to
//! it: multiplexed HTTP/2 connections (one, more when one carries [`MAX_STREAMS`] streams),
//! and a stack of idle HTTP/1.1 ones.
//!
//! A pool lives in its endpoint's [`crate::endpoint::EndpointState`], so it survives table
//! swaps, and is keyed (with the endpoint) by service, address and identity: a connection
//! made for one identity is never reused for another. Taking a connection locks a mutex for
//! the few instructions it takes to clone or pop one; connecting happens outside it, and
//! concurrent requests share one HTTP/2 handshake — and its failure: requests that waited for
//! a connect that failed fail at once instead of each trying again in turn.

use super::body::RequestBody;
use hyper::client::conn::{http1, http2};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::time::Instant;

/// Idle HTTP/1.1 connections kept per upstream; more are closed when they come back.
pub const MAX_IDLE_HTTP1: usize = 64;
/// Streams one HTTP/2 connection carries before another is opened (below any peer's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` a sidecar would set: ours is 1000).
pub const MAX_STREAMS: usize = 500;
/// HTTP/2 connections per upstream at most; past that, streams queue on the least busy.
pub const MAX_HTTP2: usize = 8;

pub type H1 = http1::SendRequest<RequestBody>;
pub type H2 = http2::SendRequest<RequestBody>;

/// One HTTP/2 connection and the streams open on it.
#[derive(Clone)]
struct H2Conn {
    send: H2,
    streams: Arc<AtomicUsize>,
}

/// Counts a stream on its connection until the response ends (or fails).
#[derive(Debug)]
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Pool {
    h2: Mutex<Vec<H2Conn>>,
    /// Held while one request connects; the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// When the last HTTP/2 connect failed.
    failed_at: Mutex<Option<Instant>>,
    h1: Mutex<Vec<H1>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("h2", &lock(&self.h2).len())
            .field("h1_idle", &lock(&self.h1).len())
            .finish()
    }
}

/// The pool's data is plain values: a panic elsewhere cannot leave it inconsistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why [`Pool::h2`] gave no connection.
#[derive(Debug)]
pub enum Unavailable<E> {
    /// The connect this request waited for failed.
    FailedMeanwhile,
    Connect(E),
}

impl Pool {
    /// An HTTP/2 connection with room for a stream, and the stream counted on it. Connects
    /// (once, for every concurrent caller) when there is none or every one is full.
    pub async fn h2<F, Fut, E>(&self, connect: F) -> Result<(H2, StreamGuard), Unavailable<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<H2, E>>,
    {
        if let Some(got) = self.pick(false) {
            return Ok(got);
        }
        let asked = Instant::now();
        let _connecting = self.connecting.lock().await;
        if let Some(got) = self.pick(false) {
            return Ok(got);
        }
        if lock(&self.failed_at).is_some_and(|at| at >= asked) {
            return Err(Unavailable::FailedMeanwhile);
        }
        match connect().await {
            Ok(send) => {
                *lock(&self.failed_at) = None;
                Ok(self.add_h2(send))
            }
            Err(e) => {
                *lock(&self.failed_at) = Some(Instant::now());
                // At the cap, a busy connection is better than none.
                match self.pick(true) {
                    Some(got) => Ok(got),
                    None => Err(Unavailable::Connect(e)),
                }
            }
        }
    }

    /// The least busy open connection with room (or, with `any`, the least busy at all);
    /// closed ones are dropped. `None` when a new connection should be made.
    fn pick(&self, any: bool) -> Option<(H2, StreamGuard)> {
        let mut conns = lock(&self.h2);
        conns.retain(|c| !c.send.is_closed());
        let best = conns
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?;
        let busy = best.streams.load(Ordering::Relaxed) >= MAX_STREAMS;
        if busy && !any && conns.len() < MAX_HTTP2 {
            return None;
        }
        best.streams.fetch_add(1, Ordering::Relaxed);
        Some((best.send.clone(), StreamGuard(best.streams.clone())))
    }

    /// Adds a connection made outside [`Pool::h2`] (a retry after one went away), with one
    /// stream counted on it.
    pub fn add_h2(&self, send: H2) -> (H2, StreamGuard) {
        let conn = H2Conn {
            send,
            streams: Arc::new(AtomicUsize::new(1)),
        };
        let got = (conn.send.clone(), StreamGuard(conn.streams.clone()));
        let mut conns = lock(&self.h2);
        conns.retain(|c| !c.send.is_closed());
        conns.push(conn);
        got
    }

    /// An idle HTTP/1.1 connection ready for a request, if there is one. Connections still
    /// reading an earlier response stay in the pool.
    pub fn take_h1(&self) -> Option<H1> {
        let mut idle = lock(&self.h1);
        let mut cx = Context::from_waker(Waker::noop());
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut s) = idle.pop() {
            if s.is_closed() {
                continue;
            }
            match s.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => {
                    found = Some(s);
                    break;
                }
                Poll::Pending => busy.push(s),
                Poll::Ready(Err(_)) => {}
            }
        }
        idle.extend(busy);
        found
    }

    /// Gives a connection back once its request was sent (it becomes ready again when the
    /// response has been read).
    pub fn put_h1(&self, s: H1) {
        let mut idle = lock(&self.h1);
        if !s.is_closed() && idle.len() < MAX_IDLE_HTTP1 {
            idle.push(s);
        }
    }

    /// HTTP/2 connections open (for tests and `/config_dump`).
    pub fn h2_connections(&self) -> usize {
        let mut conns = lock(&self.h2);
        conns.retain(|c| !c.send.is_closed());
        conns.len()
    }
}
