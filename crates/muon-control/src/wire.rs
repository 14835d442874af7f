//! The `Discovery` service on the wire (proto/muon/v1/discovery.proto): the gRPC glue tonic
//! would generate, written out so that a response carries its resources already encoded and
//! its encoding is freed as soon as it is sent.
//!
//! Each snapshot encodes a resource once ([`crate::snapshot::Resource::encoded`]); every
//! stream that sends it shares those bytes. With the generated `DiscoveryResponse`, each
//! stream would deep-copy every resource it sends (the whole mesh on its first response)
//! only to encode it. An embedded message and a `bytes` field are the same on the wire, so
//! [`EncodedResponse`] is a `DiscoveryResponse` to any client.
//!
//! Responses are framed here rather than by tonic's encoder because that encoder keeps one
//! buffer per stream, as large as the largest message it ever sent: after the first
//! response (the whole mesh) every idle stream would hold a copy of it. Requests are decoded
//! by tonic as usual. Framing: gRPC over HTTP/2, length-prefixed messages
//! (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>), no compression.

use crate::discovery::{DiscoveryService, EncodedResponse, Responses};
use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;
use muon_api::v1::{self, DiscoveryRequest};
use prost::Message;
use std::convert::Infallible;
use std::pin::Pin;
use tonic::codec::Codec;
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::{Status, Streaming};

const STREAM_PATH: &str = "/muon.v1.Discovery/Stream";

/// The `Discovery` gRPC service, for tonic's router.
#[derive(Clone)]
pub struct DiscoveryServer {
    svc: DiscoveryService,
    /// Largest message, either way.
    max_message: usize,
}

impl DiscoveryServer {
    pub fn new(svc: DiscoveryService, max_message: usize) -> Self {
        DiscoveryServer { svc, max_message }
    }
}

impl tonic::server::NamedService for DiscoveryServer {
    const NAME: &'static str = v1::discovery_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for DiscoveryServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let response = if req.uri().path() == STREAM_PATH {
            self.stream(req)
        } else {
            Status::unimplemented("").into_http()
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

impl DiscoveryServer {
    fn stream<B>(&self, req: http::Request<B>) -> http::Response<tonic::body::Body>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        // We accept no compression (as tonic does unless told otherwise).
        if let Some(enc) = req.headers().get("grpc-encoding") {
            if enc != "identity" {
                let msg = format!("grpc-encoding {enc:?} is not supported");
                return Status::unimplemented(msg).into_http();
            }
        }
        // Who is asking, as its connection proved (see `auth`).
        let caller = crate::auth::Peer::from_extensions(req.extensions()).caller;
        let decoder =
            tonic_prost::ProstCodec::<EncodedResponse, DiscoveryRequest>::default().decoder();
        let inbound =
            Streaming::new_request(decoder, req.into_body(), None, Some(self.max_message));
        let body = ResponseBody {
            rx: self.svc.open(inbound, caller),
            max_message: self.max_message,
            ended: false,
        };
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            tonic::metadata::GRPC_CONTENT_TYPE,
        );
        response
    }
}

/// A stream's responses, each framed into one buffer of its own, then the trailers.
struct ResponseBody {
    rx: Responses,
    max_message: usize,
    ended: bool,
}

impl ResponseBody {
    fn end(&mut self, status: &Status) -> Frame<Bytes> {
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            // The message did not fit in a header: send the code alone.
            trailers.clear();
            let _ = Status::new(status.code(), "").add_header(&mut trailers);
            tracing::debug!(error = %e, "status message left out of the trailers");
        }
        Frame::trailers(trailers)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(resp)) => match frame(&resp, self.max_message) {
                Ok(data) => Frame::data(data),
                Err(status) => self.end(&status),
            },
            Some(Err(status)) => self.end(&status),
            None => self.end(&Status::ok("")),
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One length-prefixed gRPC message, in a buffer of exactly its size.
fn frame(resp: &EncodedResponse, max_message: usize) -> Result<Bytes, Status> {
    let len = resp.encoded_len();
    if len > max_message {
        return Err(Status::out_of_range(format!(
            "a {} response of {len} bytes is over the {max_message} byte limit",
            resp.type_url
        )));
    }
    let prefix = u32::try_from(len).map_err(|_| Status::out_of_range("response too large"))?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0); // not compressed
    buf.put_u32(prefix);
    resp.encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding a response: {e}")))?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_response_decodes_as_a_discovery_response() {
        let resource = v1::Resource {
            name: "web.shop".into(),
            version: "7".into(),
            kind: Some(v1::resource::Kind::Endpoints(v1::Endpoints {
                service: "web.shop".into(),
                ..Default::default()
            })),
        };
        let sent = EncodedResponse {
            type_url: v1::kinds::ALL[1].into(),
            version_info: "7".into(),
            nonce: "3".into(),
            resources: vec![resource.encode_to_vec().into(); 2],
            removed_resources: vec!["old.shop".into()],
            continues: true,
        };
        let got = v1::DiscoveryResponse::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            got,
            v1::DiscoveryResponse {
                type_url: sent.type_url.clone(),
                version_info: "7".into(),
                nonce: "3".into(),
                resources: vec![resource.clone(), resource],
                removed_resources: vec!["old.shop".into()],
                continues: true,
            }
        );
    }
}
