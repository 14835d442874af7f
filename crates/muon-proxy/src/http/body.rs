//! The bodies the proxy moves: requests it forwards (counted, maybe copied to a mirror) and
//! responses it sends back (an upstream's, or its own), which also finish the request's
//! access event when they end. Plain enums, no boxing per request.

use super::log::RequestLog;
use super::pool::StreamGuard;
use crate::endpoint::InFlight;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream.
#[derive(Debug)]
pub struct RequestBody {
    inner: ReqInner,
    /// Bytes forwarded so far, read by the request's log.
    sent: Option<Arc<AtomicU64>>,
    /// Mirrors' copies of every data frame; one is dropped (its body fails) when its
    /// mirror falls behind, so it never slows the real request.
    mirrors: Vec<Tee>,
}

/// One mirror's feed: the copy ends cleanly only if `done` was set first (the original
/// body ended); a copy cut short ends with an error, so the mirror never takes a truncated
/// body for a whole one.
#[derive(Debug)]
struct Tee {
    tx: mpsc::Sender<Bytes>,
    done: Arc<AtomicBool>,
}

#[derive(Debug)]
enum ReqInner {
    Incoming(Incoming),
    Full(Option<Bytes>),
    /// A mirror's copy, fed by the original request's body.
    Copy(mpsc::Receiver<Bytes>, Arc<AtomicBool>),
    /// One try of a request that may be retried (see [`Replay`]).
    Replay(Replay, usize),
}

impl RequestBody {
    /// The client's body, counted into `sent`.
    pub fn incoming(body: Incoming, sent: Arc<AtomicU64>) -> Self {
        RequestBody {
            inner: ReqInner::Incoming(body),
            sent: Some(sent),
            mirrors: Vec::new(),
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn full(b: Bytes) -> Self {
        RequestBody {
            inner: ReqInner::Full((!b.is_empty()).then_some(b)),
            sent: None,
            mirrors: Vec::new(),
        }
    }

    /// Copies this body's data to a new body for a mirror (bounded; the copy is cut, not
    /// waited for, when the mirror cannot keep up).
    pub fn tee(&mut self) -> RequestBody {
        let (tx, rx) = mpsc::channel(16);
        let done = Arc::new(AtomicBool::new(false));
        self.mirrors.push(Tee {
            tx,
            done: done.clone(),
        });
        RequestBody {
            inner: ReqInner::Copy(rx, done),
            sent: None,
            mirrors: Vec::new(),
        }
    }

    fn end_mirrors(&mut self) {
        for m in self.mirrors.drain(..) {
            m.done.store(true, Ordering::Release);
        }
    }

    /// Whether the body is known to be empty before it is read.
    pub fn is_empty(&self) -> bool {
        self.is_end_stream()
    }

    /// This body, kept (up to `cap` bytes) as it is read so that it can be sent again:
    /// the first try's body, and the [`Replay`] that makes the next ones.
    pub fn replayable(self, cap: usize) -> (RequestBody, Replay) {
        let ended = self.is_end_stream();
        let replay = Replay(Arc::new(std::sync::Mutex::new(ReplayState {
            body: self,
            frames: Vec::new(),
            bytes: 0,
            cap,
            over: false,
            ended,
        })));
        (replay.body(), replay)
    }
}

/// A request body shared by the tries of one request: the client's body is read once, by
/// whichever try reads furthest, and every frame read is kept (up to a cap) so that a later
/// try gets the whole body again. Past the cap nothing is kept and no further try can be
/// made. One try at a time reads in practice (a retry starts after the try before it got
/// its answer), so the lock is never contended.
#[derive(Debug, Clone)]
pub struct Replay(Arc<std::sync::Mutex<ReplayState>>);

#[derive(Debug)]
struct ReplayState {
    body: RequestBody,
    frames: Vec<Frame<Bytes>>,
    bytes: usize,
    cap: usize,
    /// More than `cap` was read: the kept frames were dropped.
    over: bool,
    /// The client's body ended (every frame is in `frames`, unless `over`).
    ended: bool,
}

impl Replay {
    /// A body for one more try, from the first frame.
    pub fn body(&self) -> RequestBody {
        RequestBody {
            inner: ReqInner::Replay(self.clone(), 0),
            sent: None,
            mirrors: Vec::new(),
        }
    }

    /// Whether another try can have the whole body: what was read so far is kept.
    pub fn can_replay(&self) -> bool {
        !self.0.lock().is_ok_and(|s| s.over)
    }

    fn poll_frame(
        &self,
        at: &mut usize,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut s) = self.0.lock() else {
            return Poll::Ready(Some(Err("request body lost".into())));
        };
        if let Some(f) = s.frames.get(*at) {
            *at += 1;
            return Poll::Ready(Some(Ok(copy_frame(f))));
        }
        // Past the cap only the try that crossed it reads on (the others lack the start).
        if s.over && *at != LIVE {
            return Poll::Ready(Some(Err("request body too large to send again".into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut s.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(f) => f,
        };
        match &frame {
            None => s.ended = true,
            Some(Ok(f)) if !s.over => {
                s.bytes += f.data_ref().map_or(0, Bytes::len);
                if s.bytes > s.cap {
                    s.over = true;
                    s.frames = Vec::new();
                    *at = LIVE;
                } else {
                    s.frames.push(copy_frame(f));
                    *at += 1;
                }
            }
            _ => {}
        }
        if s.body.is_end_stream() {
            s.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self, at: usize) -> bool {
        self.0
            .lock()
            .is_ok_and(|s| s.ended && (at == LIVE || at >= s.frames.len()))
    }

    fn size_hint(&self, at: usize) -> SizeHint {
        let Ok(s) = self.0.lock() else {
            return SizeHint::default();
        };
        match (s.ended, at) {
            (true, LIVE) => SizeHint::with_exact(0),
            (true, _) => {
                let rest = s.frames.get(at..).unwrap_or_default();
                let n: usize = rest
                    .iter()
                    .map(|f| f.data_ref().map_or(0, Bytes::len))
                    .sum();
                SizeHint::with_exact(n as u64)
            }
            (false, 0) if s.frames.is_empty() => s.body.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// The position of the try that read past the cap: it reads the client's body live.
const LIVE: usize = usize::MAX;

/// A frame's copy (data is reference-counted; trailers are copied).
fn copy_frame(f: &Frame<Bytes>) -> Frame<Bytes> {
    match (f.data_ref(), f.trailers_ref()) {
        (Some(d), _) => Frame::data(d.clone()),
        (None, Some(t)) => Frame::trailers(t.clone()),
        (None, None) => Frame::data(Bytes::new()),
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            ReqInner::Incoming(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Some(Ok(f)),
                Poll::Ready(Some(Err(e))) => Some(Err(e.into())),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
            ReqInner::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            ReqInner::Copy(rx, done) => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Some(Ok(Frame::data(b))),
                Poll::Ready(None) if done.load(Ordering::Acquire) => None,
                Poll::Ready(None) => Some(Err("the mirror fell behind; its copy was cut".into())),
                Poll::Pending => return Poll::Pending,
            },
            ReqInner::Replay(r, at) => return r.poll_frame(at, cx),
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    if let Some(sent) = &this.sent {
                        sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    this.mirrors.retain(|m| m.tx.try_send(data.clone()).is_ok());
                }
                // A body of known length may not be polled past its last frame.
                if !this.mirrors.is_empty() && this.is_end_stream() {
                    this.end_mirrors();
                }
            }
            // The end: the mirrors' copies end too, whole.
            None => this.end_mirrors(),
            // A failed body: the copies are cut.
            Some(Err(_)) => this.mirrors.clear(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ReqInner::Incoming(b) => b.is_end_stream(),
            ReqInner::Full(b) => b.is_none(),
            ReqInner::Copy(..) => false,
            ReqInner::Replay(r, at) => r.is_end_stream(*at),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ReqInner::Incoming(b) => b.size_hint(),
            ReqInner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqInner::Copy(..) => SizeHint::default(),
            ReqInner::Replay(r, at) => r.size_hint(*at),
        }
    }
}

/// A response body on its way to the client. When it ends (or the client goes away) it
/// writes the request's access event and counts it.
#[derive(Debug)]
pub struct ResponseBody {
    inner: RespInner,
    log: Option<Box<RequestLog>>,
    /// Released when the response is done with.
    _held: Held,
}

/// What a response holds until it ends: its HTTP/2 stream's place on a pooled connection,
/// its count in the endpoint's in-flight requests, and in its service's.
#[derive(Debug, Default)]
pub struct Held {
    pub stream: Option<StreamGuard>,
    pub in_flight: Option<InFlight>,
    /// The request's place under its service's `maxRequests`.
    pub request: Option<crate::endpoint::Slot>,
}

#[derive(Debug)]
enum RespInner {
    Incoming(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Incoming, log: Option<Box<RequestLog>>, held: Held) -> Self {
        ResponseBody {
            inner: RespInner::Incoming(body),
            log,
            _held: held,
        }
    }

    pub fn full(b: Bytes, log: Option<Box<RequestLog>>) -> Self {
        ResponseBody {
            inner: RespInner::Full((!b.is_empty()).then_some(b)),
            log,
            _held: Held::default(),
        }
    }

    /// Sets (or replaces) the log this body finishes.
    pub fn set_log(&mut self, log: Box<RequestLog>) {
        self.log = Some(log);
    }

    fn finish(&mut self) {
        if let Some(log) = self.log.take() {
            log.finish();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            RespInner::Incoming(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Some(Ok(f)),
                Poll::Ready(Some(Err(e))) => {
                    if let Some(log) = this.log.as_mut() {
                        log.error = Some("upstream-reset");
                    }
                    Some(Err(e.into()))
                }
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
            RespInner::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(log) = this.log.as_mut() {
                    if let Some(data) = f.data_ref() {
                        log.bytes_received += data.len() as u64;
                    } else if let Some(trailers) = f.trailers_ref() {
                        log.grpc_status_from(trailers);
                    }
                }
            }
            Some(Err(_)) | None => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RespInner::Incoming(b) => b.is_end_stream(),
            RespInner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RespInner::Incoming(b) => b.size_hint(),
            RespInner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Never read to the end: the client went away, or hyper needed no body (HEAD, 204).
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn read(b: RequestBody) -> Result<Bytes, BoxError> {
        Ok(b.collect().await?.to_bytes())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_kept_body_is_sent_whole_again_and_a_larger_one_is_not() {
        let (first, replay) = RequestBody::full(Bytes::from_static(b"hello")).replayable(16);
        assert_eq!(read(first).await.unwrap(), "hello");
        assert!(replay.can_replay());
        let again = replay.body();
        assert_eq!(again.size_hint().exact(), Some(5));
        assert_eq!(read(again).await.unwrap(), "hello");
        assert_eq!(read(replay.body()).await.unwrap(), "hello");

        // A try that stopped reading early: the next one gets what was read, then the rest.
        let (first, replay) = RequestBody::full(Bytes::from_static(b"hi")).replayable(16);
        drop(first);
        assert_eq!(read(replay.body()).await.unwrap(), "hi");

        // Past the cap the first try still gets the whole body; no other try can.
        let (first, replay) = RequestBody::full(Bytes::from(vec![b'x'; 64])).replayable(16);
        assert_eq!(read(first).await.unwrap().len(), 64);
        assert!(!replay.can_replay());
        assert!(read(replay.body()).await.is_err());

        // An empty body ends at once, on every try (HTTP/1.1 sends no chunked encoding).
        let (first, replay) = RequestBody::empty().replayable(16);
        assert!(first.is_end_stream());
        assert!(replay.body().is_end_stream());
    }
}
