//! The gateway's `hostPort`: a port on the host's 127.0.0.1 forwarded into the gateway pod,
//! so a browser or curl on the host reaches the mesh's edge.
//!
//! One small process (`muonctl lab forward`, started by `lab up`): it binds its listener in
//! the host's namespace first, then moves itself into the gateway pod's namespace, where
//! every connection it makes is to the gateway on the pod's own loopback. The listener keeps
//! the namespace it was made in; nothing is added to the host's interfaces, routes or
//! iptables. Because the process now lives in the pod's namespace, `lab down` stops it with
//! the pod's other processes.

use crate::state::{self, LabState, PodState};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Connections forwarded at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 256;

/// Starts the forwarder for a gateway pod; returns its pid once it is listening.
pub fn spawn(lab: &LabState, pod: &PodState, host_port: u16) -> Result<i32> {
    let port = pod.gateway.as_ref().context("not a gateway pod")?.port;
    let exe = std::env::current_exe()?;
    if exe.file_name().is_none_or(|n| n != "muonctl") {
        bail!("gateway.hostPort needs the lab to be started by muonctl");
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state::log_file(&lab.name, &pod.name, "forward"))?;
    let err = log.try_clone()?;
    let child = Command::new(exe)
        .args(["lab", "forward", "--netns", &pod.netns])
        .arg("--listen")
        .arg(format!("127.0.0.1:{host_port}"))
        .arg("--to")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("starting the host port forwarder")?;
    let pid = child.id() as i32;
    let listening: SocketAddr = ([127, 0, 0, 1], host_port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect_timeout(&listening, Duration::from_millis(200)).is_err() {
        if std::time::Instant::now() > deadline || !crate::process::alive(pid) {
            bail!(
                "the forwarder for 127.0.0.1:{host_port} did not start; see {}",
                state::log_file(&lab.name, &pod.name, "forward").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

/// The forwarder itself: listens on `listen` (in the current, host, namespace), joins
/// `netns` and copies every connection to `to` there. Runs until killed.
pub fn run(netns: &str, listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let file = std::fs::File::open(crate::netns::netns_path(netns))
        .with_context(|| format!("network namespace {netns} does not exist"))?;
    // The main thread moves; threads started from here on begin in the pod's namespace.
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("cannot enter network namespace {netns}"))?;
    eprintln!("forwarding {listen} (host) to {to} in {netns}");
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue;
        }
        let open = open.clone();
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::spawn(move || {
            if let Err(e) = pipe(client, to) {
                eprintln!("forward: {e:#}");
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    Ok(())
}

/// Copies both ways until both sides are done, preserving half-close.
fn pipe(client: TcpStream, to: SocketAddr) -> Result<()> {
    let upstream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    let (c2, u2) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || copy(client, u2));
    copy(upstream, c2);
    let _ = up.join();
    Ok(())
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
