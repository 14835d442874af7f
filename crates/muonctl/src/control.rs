//! The connection to the control plane's management API, and the one place its errors are
//! turned into short messages that say what to do.

use anyhow::{anyhow, Error, Result};
use muon_api::v1::management_client::ManagementClient;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

pub type Client = ManagementClient<Channel>;

/// Connects to `addr` (`http://host:port`; a bare `host:port` gets `http://`).
pub async fn connect(addr: &str) -> Result<Client> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| anyhow!("{addr:?} is not a control-plane address like http://127.0.0.1:15010 (set --control-plane)"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach the control plane at {url}: {} (is muon-control running? set --control-plane)",
            root_cause(&e)
        )
    })?;
    Ok(ManagementClient::new(channel))
}

/// A failed call, as a message: INVALID_ARGUMENT (and the other "your request" codes) as the
/// server wrote it; transport failures with a hint.
pub fn status_error(addr: &str, what: &str, status: tonic::Status) -> Error {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
            anyhow!("{}", status.message())
        }
        Code::NotFound => anyhow!("{}", status.message()),
        Code::Unavailable => anyhow!(
            "cannot reach the control plane at {addr}: {} (is muon-control running? set --control-plane)",
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
