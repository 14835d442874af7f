//! The bodies the proxy moves: requests it forwards (counted, maybe copied to a mirror) and
//! responses it sends back (an upstream's, or its own), which also finish the request's
//! access event when they end. Plain enums, no boxing per request.

use super::log::RequestLog;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// A mirror's copy of every data frame; dropped (the mirror's body fails) when the
    /// mirror falls behind, so it never slows the real request.
    mirror: Option<mpsc::Sender<Bytes>>,
}

#[derive(Debug)]
enum ReqInner {
    Incoming(Incoming),
    Full(Option<Bytes>),
    /// A mirror's copy, fed by the original request's body.
    Copy(mpsc::Receiver<Bytes>),
}

impl RequestBody {
    /// The client's body, counted into `sent`.
    pub fn incoming(body: Incoming, sent: Arc<AtomicU64>) -> Self {
        RequestBody {
            inner: ReqInner::Incoming(body),
            sent: Some(sent),
            mirror: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn full(b: Bytes) -> Self {
        RequestBody {
            inner: ReqInner::Full((!b.is_empty()).then_some(b)),
            sent: None,
            mirror: None,
        }
    }

    /// Copies this body's data to a new body for a mirror (bounded; the copy is cut, not
    /// waited for, when the mirror cannot keep up).
    pub fn tee(&mut self) -> RequestBody {
        let (tx, rx) = mpsc::channel(16);
        self.mirror = Some(tx);
        RequestBody {
            inner: ReqInner::Copy(rx),
            sent: None,
            mirror: None,
        }
    }

    /// Whether the body is known to be empty before it is read.
    pub fn is_empty(&self) -> bool {
        self.is_end_stream()
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
            ReqInner::Copy(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Some(Ok(Frame::data(b))),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                if let Some(sent) = &this.sent {
                    sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let Some(tx) = &this.mirror {
                    if tx.try_send(data.clone()).is_err() {
                        this.mirror = None;
                    }
                }
            }
        }
        if frame.is_none() {
            // The end: the mirror's copy ends too.
            this.mirror = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ReqInner::Incoming(b) => b.is_end_stream(),
            ReqInner::Full(b) => b.is_none(),
            ReqInner::Copy(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ReqInner::Incoming(b) => b.size_hint(),
            ReqInner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqInner::Copy(_) => SizeHint::default(),
        }
    }
}

/// A response body on its way to the client. When it ends (or the client goes away) it
/// writes the request's access event and counts it.
#[derive(Debug)]
pub struct ResponseBody {
    inner: RespInner,
    log: Option<Box<RequestLog>>,
}

#[derive(Debug)]
enum RespInner {
    Incoming(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Incoming, log: Option<Box<RequestLog>>) -> Self {
        ResponseBody {
            inner: RespInner::Incoming(body),
            log,
        }
    }

    pub fn full(b: Bytes, log: Option<Box<RequestLog>>) -> Self {
        ResponseBody {
            inner: RespInner::Full((!b.is_empty()).then_some(b)),
            log,
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
