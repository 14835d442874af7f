//! `--wait-ready`: no rules, only a wait. A classic (not native) sidecar runs this as its
//! container's postStart hook: the kubelet starts the pod's next container only once the hook
//! has returned, so the app starts after the proxy answers `GET /ready` with 200.
//!
//! A plain HTTP/1.0 request over std's TCP (no async runtime, no HTTP library): the proxy's
//! health port answers in one piece and closes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::config::WaitReady;

/// Each attempt's connect and read deadline.
const ATTEMPT: Duration = Duration::from_secs(1);
/// Between attempts.
const PAUSE: Duration = Duration::from_millis(200);

/// Waits until `GET /ready` at `w.addr` answers 200, or fails after `w.timeout` with the
/// last answer (or error) seen.
pub fn wait_ready(w: &WaitReady) -> anyhow::Result<()> {
    let deadline = Instant::now() + w.timeout;
    loop {
        let last = match probe(w.addr) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("it answered {status}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() + PAUSE >= deadline {
            anyhow::bail!(
                "the proxy at {} was not ready within {} (last: {last})",
                w.addr,
                muon_core::duration::format(w.timeout)
            );
        }
        std::thread::sleep(PAUSE);
    }
}

/// One `GET /ready`: the status code.
fn probe(addr: SocketAddr) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, ATTEMPT)?;
    s.set_read_timeout(Some(ATTEMPT))?;
    s.set_write_timeout(Some(ATTEMPT))?;
    s.write_all(format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    // The status line is all we need.
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().and_then(|c| c.parse().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP answer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A health port that says 503 `not_ready` times, then 200.
    fn health(not_ready: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { return };
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                let answer = match i < not_ready {
                    true => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                    false => "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n",
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn returns_once_the_proxy_answers_200() {
        let addr = health(2);
        let w = WaitReady {
            addr,
            timeout: Duration::from_secs(60),
        };
        wait_ready(&w).unwrap();
    }

    #[test]
    fn gives_up_with_the_last_answer() {
        let addr = health(usize::MAX);
        let w = WaitReady {
            addr,
            timeout: Duration::from_millis(500),
        };
        let err = wait_ready(&w).unwrap_err().to_string();
        assert!(err.contains("was not ready within 500ms"), "{err}");
        assert!(err.contains("it answered 503"), "{err}");
    }

    #[test]
    fn an_unreachable_proxy_fails_with_the_connect_error() {
        // Bound and dropped: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let w = WaitReady {
            addr,
            timeout: Duration::from_millis(300),
        };
        let err = wait_ready(&w).unwrap_err().to_string();
        assert!(err.contains("refused"), "{err}");
    }
}
