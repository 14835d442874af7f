//! The answers the proxy gives itself, in one place (after linkerd2-proxy's
//! `errors/respond.rs`): each carries `x-muon-error: <reason>` so nobody mistakes it for the
//! app's, and a gRPC client gets a trailers-only answer with the matching `grpc-status`.

use super::body::ResponseBody;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// The header that marks an answer as the proxy's own.
pub const ERROR_HEADER: &str = "x-muon-error";

/// Why the proxy answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The request could not be read as HTTP (400).
    BadRequest,
    /// The header section is larger than `--max-header-bytes` (431).
    HeadersTooLarge,
    /// Routes are attached to the service, and none matches (404).
    NoRoute,
    /// The matched rule's backend does not exist, or every weight is 0 (500).
    NoBackend,
    /// The backend has no endpoints (503).
    NoEndpoints,
    /// Connecting to the endpoint failed (502).
    ConnectFailed,
    /// The upstream failed before answering (502).
    UpstreamFailed,
    /// `timeouts.request` or `timeouts.backendRequest` passed (504).
    Timeout,
    /// The proxy is shutting down (503).
    Draining,
    /// An authorization policy denied the request (403; see [`respond_denied`]).
    Denied,
    /// A circuit breaker's limit is reached (`maxRequests`, `maxPendingRequests`): 503 at
    /// once rather than a queue.
    Overloaded,
    /// An abort fault of the service's TrafficPolicy, with its status.
    FaultAbort(u16),
}

impl ProxyError {
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::BadRequest => "bad-request",
            ProxyError::HeadersTooLarge => "request-headers-too-large",
            ProxyError::NoRoute => "no-route",
            ProxyError::NoBackend => "no-backend",
            ProxyError::NoEndpoints => "no-healthy-endpoints",
            ProxyError::ConnectFailed => "upstream-connect-failed",
            ProxyError::UpstreamFailed => "upstream-failed",
            ProxyError::Timeout => "timeout",
            ProxyError::Draining => "draining",
            ProxyError::Denied => "rbac-denied",
            ProxyError::Overloaded => "overloaded",
            ProxyError::FaultAbort(_) => "fault-abort",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoints | ProxyError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectFailed | ProxyError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Denied => StatusCode::FORBIDDEN,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FaultAbort(s) => {
                StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// The gRPC status code a gRPC client gets instead (grpc/doc/statuscodes.md).
    pub fn grpc_status(self) -> u32 {
        match self {
            ProxyError::BadRequest => 13,     // INTERNAL
            ProxyError::HeadersTooLarge => 8, // RESOURCE_EXHAUSTED
            ProxyError::NoRoute => 12,        // UNIMPLEMENTED
            ProxyError::Timeout => 4,         // DEADLINE_EXCEEDED
            ProxyError::Denied => 7,          // PERMISSION_DENIED
            ProxyError::FaultAbort(s) => grpc_status_for(s),
            ProxyError::NoBackend
            | ProxyError::NoEndpoints
            | ProxyError::ConnectFailed
            | ProxyError::UpstreamFailed
            | ProxyError::Draining
            | ProxyError::Overloaded => 14, // UNAVAILABLE
        }
    }
}

/// The gRPC status for an HTTP status (grpc/doc/http-grpc-status-mapping.md).
pub fn grpc_status_for(status: u16) -> u32 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// Whether a request is a gRPC call (its answer must be a gRPC answer).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The proxy's answer for `err`: plain text for HTTP clients; for gRPC, HTTP 200 with
/// `grpc-status` and `grpc-message` and no body (a trailers-only response).
pub fn respond(err: ProxyError, grpc: bool) -> Response<ResponseBody> {
    let reason = err.reason();
    let mut resp = if grpc {
        let mut r = Response::new(ResponseBody::full(Default::default(), None));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(err.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(reason));
        r
    } else {
        let body = format!("{} {reason}\n", err.status().as_u16());
        let mut r = Response::new(ResponseBody::full(body.into(), None));
        *r.status_mut() = err.status();
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason));
    if let ProxyError::FaultAbort(_) = err {
        resp.headers_mut()
            .insert("x-muon-fault", HeaderValue::from_static("abort"));
    }
    resp
}

/// The answer to a request an authorization policy denied: 403 (gRPC: `PERMISSION_DENIED`)
/// with `message` naming the policy, as the body (gRPC: `grpc-message`).
pub fn respond_denied(message: &str, grpc: bool) -> Response<ResponseBody> {
    let err = ProxyError::Denied;
    let mut resp = respond(err, grpc);
    if grpc {
        // grpc-message is percent-encoded (PROTOCOL-HTTP2.md); the message is plain ASCII
        // but for what a policy name cannot hold.
        let text: String = message
            .chars()
            .map(|c| {
                if (' '..='~').contains(&c) && c != '%' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().insert("grpc-message", v);
        }
    } else {
        *resp.body_mut() = ResponseBody::full(format!("{message}\n").into(), None);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc_clients_get_marked_answers_with_their_status() {
        let r = respond(ProxyError::NoEndpoints, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "no-healthy-endpoints");
        let g = respond(ProxyError::Timeout, true);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "4");
        assert_eq!(g.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(g.headers()[ERROR_HEADER], "timeout");
        let mut h = http::HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
    }

    #[test]
    fn overload_and_aborts_have_their_status_and_grpc_code() {
        let r = respond(ProxyError::Overloaded, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "overloaded");
        let g = respond(ProxyError::Overloaded, true);
        assert_eq!(g.headers()["grpc-status"], "14");
        let a = respond(ProxyError::FaultAbort(418), false);
        assert_eq!(a.status(), 418);
        assert_eq!(a.headers()[ERROR_HEADER], "fault-abort");
        assert_eq!(a.headers()["x-muon-fault"], "abort");
        assert_eq!(ProxyError::FaultAbort(503).grpc_status(), 14);
        assert_eq!(ProxyError::FaultAbort(500).grpc_status(), 2);
    }

    #[test]
    fn a_denied_request_gets_403_naming_the_policy_and_grpc_permission_denied() {
        let msg = "RBAC: access denied by policy shop/deny-admin";
        let r = respond_denied(msg, false);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[ERROR_HEADER], "rbac-denied");
        let g = respond_denied(msg, true);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "7");
        assert_eq!(g.headers()["grpc-message"], msg);
        assert_eq!(g.headers()[ERROR_HEADER], "rbac-denied");
    }
}
