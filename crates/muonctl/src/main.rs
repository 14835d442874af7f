//! `muonctl`: the command line for Muon: the lab (`muonctl lab …`) and the control plane's
//! management API (`apply`, `delete`, `get`, `proxy-status`, `config-dump`, `token`), and
//! Kubernetes manifests (`inject`, `install`) and what is wrong with an install (`check`).
#![forbid(unsafe_code)]

mod apply;
mod check;
mod control;
mod get;
mod inject;
mod install;
mod manifest;
mod proxy_status;
mod token;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use muon_lab::{LabPhase, LabStatus, UpOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "muonctl", version, about = "Muon service mesh CLI")]
struct Cli {
    /// The control plane's management API.
    #[arg(
        long,
        global = true,
        env = "MUON_CONTROL_PLANE",
        default_value = "http://127.0.0.1:15010"
    )]
    control_plane: String,
    /// Talk to the control plane of this lab (and to its pods), from the host.
    #[arg(long, global = true, env = "MUON_LAB")]
    lab: Option<String>,
    /// An administrator credential directory (`ca.pem`, `cert.pem`, `key.pem`; muon-control
    /// writes one to `<data-dir>/admin`): talk TLS to the control plane with it. With
    /// --lab, the lab's. Without either, plaintext (a control plane run with
    /// `--insecure-plaintext`).
    #[arg(long, global = true, env = "MUON_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Give up connecting to the control plane after this long.
    #[arg(
        long,
        global = true,
        env = "MUON_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = parse_timeout
    )]
    connect_timeout: Duration,
    /// How long to wait: for each answer of the control plane (default 30s); with `lab up`,
    /// for pods and sidecars to become ready (default 60s); with `lab restart`, for the
    /// restarted process (default 30s).
    #[arg(long, global = true, env = "MUON_TIMEOUT", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local mesh on this Linux host: pods as network namespaces (root required).
    #[command(subcommand)]
    Lab(Lab),
    /// Create or update objects from manifests, all or nothing.
    Apply(apply::ApplyArgs),
    /// Delete objects, by manifest or by kind and name.
    Delete(apply::DeleteArgs),
    /// Show services, workloads, endpoints, routes, policies or proxies.
    Get(get::GetArgs),
    /// Each connected sidecar: per kind SYNCED, STALE or NACKED, and its last error.
    ProxyStatus(proxy_status::ProxyStatusArgs),
    /// What a sidecar actually uses (its admin /config_dump).
    ConfigDump(proxy_status::ConfigDumpArgs),
    /// Join tokens: how a sidecar outside Kubernetes proves its identity.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Add Muon's init container and sidecar to the workloads of Kubernetes manifests
    /// (what the control plane's admission webhook does), printing them to stdout.
    Inject(inject::InjectArgs),
    /// Print the manifests that install Muon on Kubernetes (`muonctl install | kubectl apply -f -`).
    Install(install::InstallArgs),
    /// What is wrong with Muon's install on a cluster: one line per check, exit 1 on a FAIL.
    Check(check::CheckArgs),
}

#[derive(Subcommand)]
enum Lab {
    /// Create the pods and services of a topology file and start their apps and sidecars.
    Up(UpArgs),
    /// Run a command inside a pod, as the pod's app user.
    Exec {
        name: String,
        pod: String,
        /// Run as this UID instead of the app's (0 = root).
        #[arg(long)]
        user: Option<u32>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show labs, their pods (address, zone, app and sidecar state) and services.
    Status {
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a pod's app log, or its sidecar's with --sidecar.
    Logs {
        name: String,
        pod: String,
        #[arg(long)]
        sidecar: bool,
    },
    /// Restart a pod's app, or its sidecar with --sidecar.
    Restart {
        name: String,
        pod: String,
        #[arg(long)]
        sidecar: bool,
    },
    /// Stop a pod's app, or its sidecar with --sidecar (the pod keeps its address;
    /// `lab restart` starts it again).
    Stop {
        name: String,
        pod: String,
        #[arg(long)]
        sidecar: bool,
    },
    /// (Started by `lab up` for a gateway's hostPort) forward a host port into a pod.
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
    },
    /// Remove a lab: every namespace, interface, process and file it made.
    Down {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Remove every lab on this host.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args)]
struct UpArgs {
    /// The topology file.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// The lab's name (default: the file's name). Two labs with different names run side by side.
    #[arg(long)]
    name: Option<String>,
    /// Return once the lab is ready and leave it running; stop it with `muonctl lab down`.
    #[arg(long)]
    detach: bool,
    /// Where muon-proxy and muon-init are (default: $MUON_BIN_DIR, else beside muonctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// A time limit: a duration above zero (`30s`, `500ms`, `1m`, or seconds).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    muon_core::duration::parse_flag_positive(s)
}

/// What `--timeout` means where the command is not a call to the control plane.
const LAB_UP_TIMEOUT: Duration = Duration::from_secs(60);
const LAB_RESTART_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("muonctl: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let target = control::Target {
        addr: cli.control_plane,
        connect_timeout: cli.connect_timeout,
        timeout: cli.timeout.unwrap_or(CALL_TIMEOUT),
        credentials: cli.credentials,
    };
    match cli.command {
        Command::Lab(lab) => run_lab(lab, cli.timeout),
        Command::Apply(args) => via_lab(cli.lab, target, args, apply::apply),
        Command::Delete(args) => via_lab(cli.lab, target, args, apply::delete),
        Command::Get(args) => via_lab(cli.lab, target, args, get::get),
        Command::ProxyStatus(args) => via_lab(cli.lab, target, args, proxy_status::run),
        Command::Token(cmd) => via_lab(cli.lab, target, cmd, token::run),
        Command::ConfigDump(args) => proxy_status::config_dump(cli.lab.as_deref(), args),
        Command::Inject(args) => inject::run(args),
        Command::Install(args) => install::run(args),
        Command::Check(args) => check::run(
            args,
            target.connect_timeout,
            cli.timeout.unwrap_or(CALL_TIMEOUT),
        ),
    }
}

/// Runs a management command against `target`, or, with `--lab`, against that lab's control
/// plane: pod addresses exist only inside the lab, so the command runs on a thread that has
/// joined the control plane pod's network namespace.
fn via_lab<A: Send + 'static>(
    lab: Option<String>,
    mut target: control::Target,
    args: A,
    command: fn(&control::Target, A) -> Result<i32>,
) -> Result<i32> {
    let Some(lab) = lab else {
        return command(&target, args);
    };
    let state = muon_lab::LabState::load(&lab)?;
    let cp = state
        .control_plane_pod()
        .with_context(|| format!("lab {lab} has no control plane (controlPlane: false)"))?;
    target.addr = format!("http://{}:{}", cp.ip, muon_core::ports::CONTROL);
    if target.credentials.is_none() {
        target.credentials = Some(muon_lab::control::admin_dir(&lab));
    }
    muon_lab::netns::in_netns(&cp.netns, move || command(&target, args))
}

fn run_lab(cmd: Lab, timeout: Option<Duration>) -> Result<i32> {
    match cmd {
        Lab::Up(args) => up(args, timeout.unwrap_or(LAB_UP_TIMEOUT)),
        Lab::Exec {
            name,
            pod,
            user,
            command,
        } => muon_lab::exec(&name, &pod, &command, user),
        Lab::Status { name, output } => {
            let names = match name {
                Some(n) => vec![n],
                None => muon_lab::list_labs(),
            };
            let labs = names
                .iter()
                .map(|n| muon_lab::status(n))
                .collect::<Result<Vec<_>>>()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&labs)?),
                Output::Table if labs.is_empty() => println!("no labs are up"),
                Output::Table => labs.iter().for_each(print_status),
            }
            Ok(0)
        }
        Lab::Logs { name, pod, sidecar } => {
            let path = muon_lab::logs(&name, &pod, sidecar)?;
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            use std::io::Write;
            std::io::stdout().write_all(&text)?;
            Ok(0)
        }
        Lab::Restart { name, pod, sidecar } => {
            let timeout = timeout.unwrap_or(LAB_RESTART_TIMEOUT);
            muon_lab::restart(&name, &pod, sidecar, timeout)?;
            println!(
                "restarted the {} of {pod}",
                if sidecar { "sidecar" } else { "app" }
            );
            Ok(0)
        }
        Lab::Stop { name, pod, sidecar } => {
            let what = if sidecar { "sidecar" } else { "app" };
            match muon_lab::stop(&name, &pod, sidecar)? {
                true => println!("stopped the {what} of {pod}"),
                false => println!("the {what} of {pod} was not running"),
            }
            Ok(0)
        }
        Lab::Forward { netns, listen, to } => {
            muon_lab::forward::run(&netns, listen, to)?;
            Ok(0)
        }
        Lab::Down { name, all } => {
            let names = match name {
                Some(n) => vec![n],
                None if all => muon_lab::list_labs(),
                None => bail!("name a lab or pass --all"),
            };
            for n in names {
                let r = muon_lab::down(&n)?;
                println!(
                    "lab {n} removed ({} namespaces, {} processes stopped)",
                    r.namespaces.len(),
                    r.processes
                );
            }
            Ok(0)
        }
    }
}

fn up(args: UpArgs, ready_timeout: Duration) -> Result<i32> {
    let opts = UpOptions {
        topology: args.file,
        name: args.name,
        bin_dir: args.bin_dir,
        ready_timeout,
        supervisor: !args.detach,
    };
    // From here a Ctrl-C, SIGTERM or SIGHUP makes `up` remove what it made, and, once the
    // lab is up, makes the foreground supervisor take it down.
    muon_lab::signals::catch()?;
    let lab = match muon_lab::up(&opts) {
        Ok(lab) => lab,
        Err(e) => match e.downcast_ref::<muon_lab::Interrupted>() {
            Some(stop) => {
                eprintln!("muonctl: {e:#}");
                return Ok(stop.exit_code());
            }
            None => return Err(e),
        },
    };
    print_status(&muon_lab::status(&lab.name)?);
    // An app pod: the control plane's and the gateway's have no sidecar to try the mesh from.
    let first = lab
        .pods
        .iter()
        .find(|p| p.sidecar)
        .or_else(|| {
            lab.pods
                .iter()
                .find(|p| p.gateway.is_none() && Some(&p.name) != lab.control_plane.as_ref())
        })
        .map(|p| p.name.as_str())
        .unwrap_or("POD");
    for (pod, g) in lab
        .pods
        .iter()
        .filter_map(|p| Some((p, p.gateway.as_ref()?)))
    {
        let scheme = if g.tls { "https" } else { "http" };
        println!(
            "\ngateway {}: {scheme}://{}:{}/ in the lab",
            pod.name, pod.ip, g.port
        );
        if let Some(hp) = g.host_port {
            println!("  and {scheme}://127.0.0.1:{hp}/ on this host");
        }
    }
    if args.detach {
        println!("\nlab {} is up.", lab.name);
        println!(
            "  run in a pod:  muonctl lab exec {} {first} -- curl -s http://SERVICE:PORT/",
            lab.name
        );
        println!("  stop it:       muonctl lab down {}", lab.name);
        return Ok(0);
    }
    println!("\nlab {} is up; Ctrl-C stops it.", lab.name);
    wait_for_stop(&lab.name)?;
    let r = muon_lab::down(&lab.name)?;
    println!(
        "lab {} removed ({} namespaces)",
        lab.name,
        r.namespaces.len()
    );
    Ok(0)
}

/// The foreground `up` is the lab's supervisor: it waits for Ctrl-C, SIGTERM or SIGHUP
/// (caught since before `up`), or for `muonctl lab down` run elsewhere, reaping pod processes
/// that exit meanwhile.
fn wait_for_stop(name: &str) -> Result<()> {
    let state = muon_lab::state::state_file(name);
    while muon_lab::signals::received().is_none() && state.exists() {
        muon_lab::process::reap_children();
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn print_status(s: &LabStatus) {
    let phase = match s.phase {
        LabPhase::Up => "up",
        LabPhase::Starting => "starting",
        LabPhase::Incomplete => "INCOMPLETE",
    };
    println!(
        "lab {}  {phase}  (topology {}, ipv6 {})",
        s.name,
        s.topology_file.as_deref().unwrap_or("unknown"),
        if s.ipv6 { "on" } else { "off" }
    );
    if let Some(problem) = &s.problem {
        println!("  {problem}");
    }
    if s.pods.is_empty() {
        if !s.namespaces.is_empty() {
            println!("  namespaces left: {}", s.namespaces.join(", "));
        }
        return;
    }
    println!(
        "  {:<20} {:<12} {:<16} {:<10} {:<8} {:<10}",
        "POD", "NAMESPACE", "IP", "ZONE", "APP", "SIDECAR"
    );
    for p in &s.pods {
        println!(
            "  {:<20} {:<12} {:<16} {:<10} {:<8} {:<10}",
            p.pod.name,
            p.pod.namespace,
            p.pod.ip.to_string(),
            p.pod.zone.as_deref().unwrap_or("-"),
            if p.app_running { "running" } else { "exited" },
            p.sidecar
        );
    }
    if !s.services.is_empty() {
        println!(
            "  {:<20} {:<12} {:<16} {:<10} ENDPOINTS",
            "SERVICE", "NAMESPACE", "VIP", "PORTS"
        );
        for svc in &s.services {
            let ports: Vec<String> = svc.ports.iter().map(|p| p.to_string()).collect();
            println!(
                "  {:<20} {:<12} {:<16} {:<10} {}",
                svc.name,
                svc.namespace,
                svc.vip.to_string(),
                ports.join(","),
                svc.endpoints.join(",")
            );
        }
    }
}
