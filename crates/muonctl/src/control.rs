//! The connection to the control plane's management API: every connect and every call has a
//! deadline, and this is the one place their failures are turned into short messages that say
//! what happened and what to do.
//!
//! The deadlines (`--connect-timeout`, `--timeout`) are outer `tokio::time::timeout`s: tonic's
//! own connect timeout covers the TCP connect only, so a server that accepts TCP and then never
//! speaks HTTP/2 (a frozen process, the wrong port) would otherwise hold muonctl forever.
//!
//! A call ends in one of four ways, told apart here:
//! - an answer;
//! - a status the control plane sent (shown as it wrote it, see [`status_error`]);
//! - no answer within `--timeout` ([`Failure::TimedOut`]);
//! - the connection broke after the request was sent ([`Failure::Lost`]): the answer is lost
//!   and the request may or may not have taken effect. Reads ([`Conn::call`]) are then sent once
//!   more on a new connection, as client-go does for GETs; writes decide for themselves
//!   (`apply.rs`).

use anyhow::{anyhow, Error, Result};
use muon_api::v1::management_client::ManagementClient;
use std::future::Future;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub type Client = ManagementClient<Channel>;

/// Where the control plane is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`; a bare `host:port` gets `http://`.
    pub addr: String,
    pub connect_timeout: Duration,
    /// For each call's answer.
    pub timeout: Duration,
    /// An administrator credential directory: TLS with it; none: plaintext.
    pub credentials: Option<std::path::PathBuf>,
}

impl Target {
    pub fn url(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("http://{}", self.addr)
        }
    }
}

/// Why a call has no answer.
#[derive(Debug)]
pub enum Failure {
    /// The control plane answered with this status.
    Status(Status),
    /// No answer within `--timeout`; the request was sent.
    TimedOut,
    /// The connection broke after the request was sent (the innermost cause).
    Lost(String),
}

/// A connection to the management API.
pub struct Conn {
    client: Client,
    /// The connection, for the control plane's other services (Identity).
    pub channel: Channel,
    target: Target,
}

/// Connects to the control plane, within `--connect-timeout`.
pub async fn connect(target: &Target) -> Result<Conn> {
    let url = target.url();
    if url.starts_with("https://") && target.credentials.is_none() {
        return Err(anyhow!(
            "{url}: TLS needs an administrator credential (--credentials DIR, or --lab NAME)"
        ));
    }
    // The connector does the TLS; tonic dials the same host and port.
    let dial = url.replacen("https://", "http://", 1);
    let endpoint = Endpoint::from_shared(dial).map_err(|_| {
        anyhow!(
            "{:?} is not a control-plane address like http://127.0.0.1:15010 (set --control-plane)",
            target.addr
        )
    })?;
    let tls = match &target.credentials {
        Some(dir) => Some(muon_api::connect::admin_tls(dir).map_err(|e| {
            anyhow!("the administrator credential: {e} (--credentials, or MUON_CREDENTIALS)")
        })?),
        None => None,
    };
    // Not tonic's `connect_timeout`: it would fire first, as a bare "deadline has elapsed".
    let connect = muon_api::connect::channel(endpoint, tls);
    let channel = match tokio::time::timeout(target.connect_timeout, connect).await {
        Err(_) => {
            return Err(anyhow!(
                "no connection to the control plane at {url} within {} (is the address right and muon-control running? --connect-timeout raises the limit)",
                human(target.connect_timeout)
            ))
        }
        Ok(Err(e)) => {
            return Err(anyhow!(
                "cannot reach the control plane at {url}: {} (is muon-control running? set --control-plane)",
                root_cause(&e)
            ))
        }
        Ok(Ok(channel)) => channel,
    };
    // The same limit as the control plane's, so any answer it can send can be read.
    let client = ManagementClient::new(channel.clone())
        .max_decoding_message_size(muon_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(muon_api::MAX_MESSAGE_BYTES);
    Ok(Conn {
        client,
        channel,
        target: target.clone(),
    })
}

impl Conn {
    pub fn url(&self) -> String {
        self.target.url()
    }

    /// One attempt of a call, within `--timeout`.
    pub async fn try_call<T, Fut>(&self, f: impl FnOnce(Client) -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match tokio::time::timeout(self.target.timeout, f(self.client.clone())).await {
            Err(_) => Err(Failure::TimedOut),
            Ok(Ok(response)) => Ok(response.into_inner()),
            // A status made on this side of the connection (tonic keeps the transport error
            // as its source) is a broken connection, not the control plane's answer.
            Ok(Err(status)) if std::error::Error::source(&status).is_some() => {
                Err(Failure::Lost(root_cause(&status)))
            }
            Ok(Err(status)) => Err(Failure::Status(status)),
        }
    }

    /// A read (nothing changes on the control plane): sent once more on a new connection if
    /// the first connection broke before the answer came.
    pub async fn call<T, Fut>(&mut self, what: &str, mut f: impl FnMut(Client) -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match self.try_call(&mut f).await {
            Ok(v) => Ok(v),
            Err(Failure::Lost(_)) => {
                *self = connect(&self.target).await?;
                self.try_call(f).await.map_err(|e| self.explain(what, e))
            }
            Err(e) => Err(self.explain(what, e)),
        }
    }

    /// A failure of `what` (`get`, `apply`, …) as a one-line message.
    pub fn explain(&self, what: &str, failure: Failure) -> Error {
        let url = self.url();
        match failure {
            Failure::Status(status) => status_error(&url, what, status),
            Failure::TimedOut => anyhow!(
                "no answer from the control plane at {url} within {} ({what}); is it overloaded? --timeout raises the limit",
                human(self.target.timeout)
            ),
            Failure::Lost(cause) => anyhow!(
                "the connection to the control plane at {url} broke before it answered ({what}): {cause} (is muon-control running?)"
            ),
        }
    }
}

/// A status the control plane sent, as a message: INVALID_ARGUMENT (and the other "your
/// request" codes) as the server wrote it; the rest with what failed.
pub fn status_error(addr: &str, what: &str, status: tonic::Status) -> Error {
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::NotFound => {
            anyhow!("{}", status.message())
        }
        // A full disk on the control plane, a watch that fell behind: its own words.
        Code::ResourceExhausted => anyhow!("{what} failed: {}", status.message()),
        Code::Unavailable => anyhow!(
            "{what} failed: the control plane at {addr} is unavailable: {}",
            status.message()
        ),
        Code::Unimplemented => anyhow!(
            "the control plane at {addr} does not support {what} (is it a muon-control of the same version?)"
        ),
        Code::DeadlineExceeded => {
            anyhow!("{what}: the control plane at {addr} did not answer in time; try again")
        }
        code => anyhow!("{what} failed: {code:?}: {}", status.message()),
    }
}

/// `30s`, `1500ms`.
pub fn human(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The innermost error: "Connection refused (os error 111)" instead of "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let text = cur.to_string();
    // "Connection refused (os error 111)" → "connection refused"
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// A runtime for one command: muonctl is short-lived and single-threaded.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_typed() {
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn a_full_disk_is_not_a_connection_problem() {
        let e = status_error(
            "http://127.0.0.1:15010",
            "apply",
            Status::resource_exhausted(
                "could not store the change: no space left on the control plane's data dir (/d)",
            ),
        );
        assert_eq!(
            e.to_string(),
            "apply failed: could not store the change: no space left on the control plane's data dir (/d)"
        );
    }
}
