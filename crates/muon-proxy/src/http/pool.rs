//! Connections to one upstream (an endpoint, or the local app), shared by every request to
//! it: at most one multiplexed HTTP/2 connection, and a stack of idle HTTP/1.1 ones.
//!
//! A pool lives in its endpoint's [`crate::endpoint::EndpointState`], so it survives table
//! swaps, and is keyed (with the endpoint) by service, address and identity: a connection
//! made for one identity is never reused for another. Taking a connection locks a mutex for
//! the few instructions it takes to clone or pop one; connecting happens outside it, and
//! concurrent first requests share one HTTP/2 handshake.

use super::body::RequestBody;
use hyper::client::conn::{http1, http2};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Idle HTTP/1.1 connections kept per upstream; more are closed when they come back.
pub const MAX_IDLE_HTTP1: usize = 64;

pub type H1 = http1::SendRequest<RequestBody>;
pub type H2 = http2::SendRequest<RequestBody>;

#[derive(Default)]
pub struct Pool {
    h2: Mutex<Option<H2>>,
    /// Held while one request connects the HTTP/2 connection; the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    h1: Mutex<Vec<H1>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("h2", &lock(&self.h2).is_some())
            .field("h1_idle", &lock(&self.h1).len())
            .finish()
    }
}

/// The pool's data is plain values: a panic elsewhere cannot leave it inconsistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// The HTTP/2 connection, connecting it (once, for every concurrent caller) when there
    /// is none or it closed.
    pub async fn h2<F, Fut, E>(&self, connect: F) -> Result<H2, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<H2, E>>,
    {
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.live_h2() {
            return Ok(s);
        }
        let s = connect().await?;
        *lock(&self.h2) = Some(s.clone());
        Ok(s)
    }

    fn live_h2(&self) -> Option<H2> {
        let mut slot = lock(&self.h2);
        match slot.as_ref() {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
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

    /// Whether an HTTP/2 connection is open (for tests and `/config_dump`).
    pub fn has_h2(&self) -> bool {
        lock(&self.h2).as_ref().is_some_and(|s| !s.is_closed())
    }
}
