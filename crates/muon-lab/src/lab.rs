//! Bringing a lab up and down: namespaces, addresses, capture, sidecars and apps.
//!
//! `up` records everything it creates in the state file *before* creating it, so a failure
//! at any step, or a killed `muonctl`, leaves nothing that `down` cannot find. `down` also
//! works from names alone: it removes every namespace called `muon-<lab>` or `muon-<lab>.*`.
//! A stop signal during `up` (see [`crate::signals`]) is checked between steps and in every
//! wait, and removes what was made like any other failure. The state file says `starting`
//! until `up` has finished, so a lab whose `up` was killed outright shows as incomplete.

use crate::addr;
use crate::control;
use crate::netns;
use crate::process::{self, Spawn};
use crate::signals::{self, Interrupted};
use crate::state::{self, GatewayPod, LabState, Phase, PodState, ServiceState};
use crate::topology::{check_name, Topology, CONTROL_PLANE_POD};
use anyhow::{bail, Context, Result};
use muon_core::{ports, Endpoint, ServiceEntry, ServicePort, ServiceTable};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to bring a lab up.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub topology: PathBuf,
    /// Default: the topology file's name without extension.
    pub name: Option<String>,
    /// Where muon-proxy and muon-init are. Default: `$MUON_BIN_DIR`, else beside this program.
    pub bin_dir: Option<PathBuf>,
    /// How long pods and sidecars get to become ready.
    pub ready_timeout: Duration,
    /// Keep this process recorded as the lab's supervisor once it is up (foreground `up`).
    /// While the lab comes up it is recorded either way.
    pub supervisor: bool,
}

/// The namespace holding a lab's bridge.
pub fn bridge_netns(lab: &str) -> String {
    format!("muon-{lab}")
}

/// The namespace of a lab's pod.
pub fn pod_netns(lab: &str, pod: &str) -> String {
    format!("muon-{lab}.{pod}")
}

/// A lab name from a file name: lowercase letters, digits and '-'.
pub fn default_name(topology: &Path) -> String {
    let stem = topology
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("lab");
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(20);
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "lab".into()
    } else {
        name
    }
}

fn host_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists() && which("ip6tables-restore").is_some()
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(process::SYSTEM_PATH.split(':').map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Checks what `up` needs from the machine, all at once.
pub fn preflight() -> Result<()> {
    let mut problems = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        problems.push(
            "the lab must run as root (it creates network namespaces and iptables rules)"
                .to_string(),
        );
    }
    for tool in ["ip", "setpriv", "sysctl", "iptables-restore"] {
        if which(tool).is_none() {
            let pkg = match tool {
                "ip" => "iproute2",
                "setpriv" => "util-linux",
                "sysctl" => "procps",
                _ => "iptables",
            };
            problems.push(format!("{tool} is not installed (Debian package {pkg})"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

fn locate_binaries(opts: &UpOptions, control_plane: bool) -> Result<PathBuf> {
    let dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => match std::env::var_os("MUON_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()?
                .parent()
                .context("cannot tell where muonctl is")?
                .to_path_buf(),
        },
    };
    for bin in binaries(control_plane) {
        if !dir.join(bin).is_file() {
            bail!(
                "{bin} not found in {}: build it (cargo build --bins) or pass --bin-dir / MUON_BIN_DIR",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// The programs a lab runs, copied into its bin directory.
fn binaries(control_plane: bool) -> &'static [&'static str] {
    if control_plane {
        &["muon-proxy", "muon-init", "muon-control"]
    } else {
        &["muon-proxy", "muon-init"]
    }
}

/// Brings a lab up and returns once every sidecar is ready and every service port accepts
/// connections. On failure, or on a stop signal once [`signals::catch`] has run, everything
/// created so far is removed; a stop is reported as an [`Interrupted`] error.
pub fn up(opts: &UpOptions) -> Result<LabState> {
    let topo = Topology::load(&opts.topology)?;
    preflight()?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| default_name(&opts.topology));
    check_name(&name, 20).map_err(|r| anyhow::anyhow!("lab name {name:?}: {r}"))?;
    let taken = || {
        anyhow::anyhow!("a lab named {name:?} is already up; stop it with `muonctl lab down {name}` or pick another --name")
    };
    if netns::exists(&bridge_netns(&name)) {
        return Err(taken());
    }
    // Claims the name atomically: of two `up`s with the same name, one gets the directory
    // and the other stops here, before it could tear down what the first one builds.
    std::fs::create_dir_all(state::LAB_ROOT)?;
    match std::fs::create_dir(state::lab_dir(&name)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken()),
        Err(e) => {
            return Err(e).with_context(|| format!("creating {}", state::lab_dir(&name).display()))
        }
    }
    let built = (|| {
        signals::check()?;
        let bins = locate_binaries(opts, topo.control_plane)?;
        let ipv6 = topo.ipv6.unwrap_or_else(host_has_ipv6);
        let mut lab = plan(&name, &topo, ipv6, opts)?;
        create(&mut lab, &topo, &bins, opts.ready_timeout)?;
        // The last step: a stop that arrives from here on finds a finished lab.
        signals::check()?;
        lab.phase = Phase::Up;
        if !opts.supervisor {
            lab.supervisor_pid = None;
        }
        lab.save()?;
        Ok::<_, anyhow::Error>(lab)
    })();
    built.map_err(|e| {
        // A stop signal may show up as another error first (Ctrl-C also reaches the `ip`
        // that was running): the signal is what happened.
        let stopped = e
            .downcast_ref::<Interrupted>()
            .map(|i| i.0)
            .or_else(signals::received);
        let removed = down(&name);
        let (e, what) = match stopped {
            Some(sig) => (
                anyhow::Error::new(Interrupted(sig)),
                format!("lab {name} was stopped while coming up"),
            ),
            None => (e, format!("lab {name} did not come up")),
        };
        match removed {
            Ok(_) => e.context(format!("{what}; everything it created was removed")),
            Err(d) => e.context(format!(
                "{what}, and removing what it created failed ({d:#}); run `muonctl lab down {name}`"
            )),
        }
    })
}

/// Decides names and addresses; creates nothing (so other sources of the same topology, such
/// as muon-control's Kubernetes source in its tests, can be compared with what a lab registers).
pub fn plan(name: &str, topo: &Topology, ipv6: bool, opts: &UpOptions) -> Result<LabState> {
    let mut pods = Vec::new();
    if topo.control_plane {
        pods.push(control::plan_pod(name, ipv6)?);
    }
    for spec in &topo.pods {
        for instance in spec.instance_names() {
            let i = pods.len();
            pods.push(PodState {
                netns: pod_netns(name, &instance),
                name: instance,
                template: spec.name.clone(),
                namespace: spec.namespace.clone(),
                service_account: spec.service_account().to_string(),
                ip: addr::pod_v4(i)?,
                ipv6: ipv6.then(|| addr::pod_v6(i)),
                zone: spec.zone.clone(),
                region: spec.region.clone(),
                cloud: spec.cloud.clone(),
                labels: spec.labels.clone(),
                app_uid: spec.run_as_user,
                sidecar: spec.sidecar,
                command: spec.command.clone(),
                env: spec.env.clone(),
                proxy_args: spec.proxy_args.clone(),
                app_pid: None,
                sidecar_pid: None,
                gateway: None,
            });
        }
    }
    if let Some(g) = &topo.gateway {
        let i = pods.len();
        let cp_ip = pods
            .first()
            .filter(|p| p.name == CONTROL_PLANE_POD)
            .map(|p| p.ip)
            .context("the gateway needs the lab's control plane")?;
        pods.push(gateway_pod(name, g, i, ipv6, cp_ip)?);
    }
    let mut services = Vec::new();
    for (j, svc) in topo.services.iter().enumerate() {
        let endpoints = topo
            .pods
            .iter()
            .filter(|p| svc.selects(p))
            .flat_map(|p| p.instance_names())
            .collect();
        services.push(ServiceState {
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
            vip: addr::vip_v4(j)?,
            vip6: ipv6.then(|| addr::vip_v6(j)),
            ports: svc.ports.iter().map(|p| p.port).collect(),
            endpoints,
        });
    }
    Ok(LabState {
        name: name.to_string(),
        bridge_netns: bridge_netns(name),
        ipv6,
        topology_file: opts.topology.display().to_string(),
        phase: Phase::Starting,
        supervisor_pid: Some(std::process::id() as i32),
        control_plane: topo.control_plane.then(|| CONTROL_PLANE_POD.to_string()),
        pods,
        services,
    })
}

/// The gateway's pod: no capture, no sidecar; its app is `muon-proxy --mode gateway`,
/// listening on the pod's addresses and serving the routes attached to the Gateway.
fn gateway_pod(
    lab: &str,
    g: &crate::topology::GatewaySpec,
    i: usize,
    ipv6: bool,
    cp_ip: Ipv4Addr,
) -> Result<PodState> {
    let port = g.port();
    let mut listen = format!("0.0.0.0:{port}");
    if ipv6 {
        listen.push_str(&format!(",[::]:{port}"));
    }
    let bin = state::bin_dir(lab).join("muon-proxy").display().to_string();
    let mut command = vec![
        bin,
        "--mode".into(),
        "gateway".into(),
        "--listen".into(),
        listen,
        "--gateway".into(),
        format!("{}.{}", g.name, g.namespace),
        "--control-plane".into(),
        format!("https://{cp_ip}:{}", ports::CONTROL),
        "--ca-bundle".into(),
        control::trust_bundle(lab).display().to_string(),
        "--join-token-file".into(),
        control::join_token_file(lab, &g.name).display().to_string(),
        "--state-dir".into(),
        state::proxy_state_dir(lab, &g.name).display().to_string(),
        "--log-format".into(),
        "json".into(),
    ];
    if g.tls.is_some() {
        let dir = state::gateway_dir(lab);
        command.extend([
            "--tls-cert".into(),
            dir.join("tls.crt").display().to_string(),
            "--tls-key".into(),
            dir.join("tls.key").display().to_string(),
        ]);
    }
    command.extend(g.proxy_args.iter().cloned());
    Ok(PodState {
        netns: pod_netns(lab, &g.name),
        name: g.name.clone(),
        template: g.name.clone(),
        namespace: g.namespace.clone(),
        service_account: g.name.clone(),
        ip: addr::pod_v4(i)?,
        ipv6: ipv6.then(|| addr::pod_v6(i)),
        zone: None,
        region: None,
        cloud: None,
        labels: BTreeMap::from([("muon.io/gateway".to_string(), g.name.clone())]),
        app_uid: ports::PROXY_UID,
        sidecar: false,
        command,
        env: BTreeMap::new(),
        proxy_args: Vec::new(),
        app_pid: None,
        sidecar_pid: None,
        gateway: Some(GatewayPod {
            port,
            tls: g.tls.is_some(),
            host_port: g.host_port,
            forward_pid: None,
        }),
    })
}

/// Copies the gateway's certificate and key where its user can read them (the key only by
/// it), and makes its state directory.
fn prepare_gateway(lab: &LabState, topo: &Topology, pod: &PodState) -> Result<()> {
    let (uid, gid) = (Some(ports::PROXY_UID.into()), Some(ports::PROXY_UID.into()));
    let dir = state::proxy_state_dir(&lab.name, &pod.name);
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(&dir, uid, gid)?;
    let Some(tls) = topo.gateway.as_ref().and_then(|g| g.tls.as_ref()) else {
        return Ok(());
    };
    let gdir = state::gateway_dir(&lab.name);
    std::fs::create_dir_all(&gdir)?;
    for (from, to, mode) in [
        (&tls.cert_file, "tls.crt", 0o644),
        (&tls.key_file, "tls.key", 0o600),
    ] {
        let to = gdir.join(to);
        std::fs::copy(from, &to).with_context(|| format!("copying the gateway's {from}"))?;
        nix::unistd::chown(&to, uid, gid)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The table every sidecar reads: services, their virtual IPs and their endpoints.
pub fn service_table(lab: &LabState, topo: &Topology) -> ServiceTable {
    let services = topo
        .services
        .iter()
        .zip(&lab.services)
        .map(|(spec, st)| ServiceEntry {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            vips: std::iter::once(IpAddr::V4(st.vip))
                .chain(st.vip6.map(IpAddr::V6))
                .collect(),
            ports: spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: p.port,
                    target_port: p.target_port(),
                    protocol: p.protocol,
                })
                .collect(),
            endpoints: lab
                .pods
                .iter()
                .filter(|p| st.endpoints.contains(&p.name))
                .map(|p| Endpoint {
                    ip: IpAddr::V4(p.ip),
                    pod: p.name.clone(),
                    zone: p.zone.clone(),
                    region: p.region.clone(),
                    cloud: p.cloud.clone(),
                    weight: None,
                    meshed: p.sidecar,
                })
                .collect(),
            traffic: spec.traffic.clone(),
            retry_constraint: None,
        })
        .collect();
    ServiceTable { services }
}

/// The pod's /etc/hosts: every service under its Kubernetes-style names, then the pod itself.
/// A pod is often named like its service (pod `web` behind service `web`): the name must then
/// mean the service, so the pod's own entry is left out rather than compete with it.
pub fn hosts_file(lab: &LabState, pod: &PodState) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for svc in &lab.services {
        let fqdn = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
        let ns_name = format!("{}.{}", svc.name, svc.namespace);
        if svc.namespace == pod.namespace {
            out.push_str(&format!("{}\t{fqdn} {ns_name} {}\n", svc.vip, svc.name));
        } else {
            out.push_str(&format!("{}\t{fqdn} {ns_name}\n", svc.vip));
        }
    }
    let shadowed = lab
        .services
        .iter()
        .any(|s| s.name == pod.name && s.namespace == pod.namespace);
    if !shadowed {
        out.push_str(&format!("{}\t{}\n", pod.ip, pod.name));
        if let Some(v6) = pod.ipv6 {
            out.push_str(&format!("{v6}\t{}\n", pod.name));
        }
    }
    out
}

fn create(lab: &mut LabState, topo: &Topology, bins: &Path, timeout: Duration) -> Result<()> {
    let dir = state::lab_dir(&lab.name);
    for sub in ["logs", "pods", "bin"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // Sidecars and apps run as other users: everything they read must be world-readable.
    for d in [
        Path::new("/run/muon"),
        Path::new(state::LAB_ROOT),
        dir.as_path(),
    ] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    lab.save()?;
    // Copies, so that a rebuild while the lab runs does not change its sidecars, and so that
    // the sidecar's user can execute them wherever the build tree is.
    for bin in binaries(lab.control_plane.is_some()) {
        let to = state::bin_dir(&lab.name).join(bin);
        std::fs::copy(bins.join(bin), &to).with_context(|| format!("copying {bin}"))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    if lab.control_plane.is_none() {
        state::write_atomic(
            &state::table_file(&lab.name),
            service_table(lab, topo).to_json().as_bytes(),
        )?;
    }

    signals::check()?;
    create_bridge(lab)?;
    for i in 0..lab.pods.len() {
        signals::check()?;
        create_pod_network(lab, i)?;
    }
    // The control plane first, with every pod and service registered, so that each sidecar's
    // first sync already holds the whole mesh.
    if let Some(cp) = lab.control_plane.clone() {
        let i = lab
            .pods
            .iter()
            .position(|p| p.name == cp)
            .context("control plane pod vanished")?;
        signals::check()?;
        control::prepare(lab)?;
        let pid = start_app(lab, &lab.pods[i])?;
        lab.pods[i].app_pid = Some(pid);
        lab.save()?;
        control::wait_ready(lab, &lab.pods[i], timeout)?;
        signals::check()?;
        control::register(lab, topo)?;
        // Every proxy gets a join token for its identity: its first certificate, then
        // mutual TLS with the others.
        let proxies: Vec<PodState> = lab
            .pods
            .iter()
            .filter(|p| p.sidecar || p.gateway.is_some())
            .cloned()
            .collect();
        signals::check()?;
        control::write_join_tokens(lab, proxies)?;
    }
    for i in 0..lab.pods.len() {
        if lab.control_plane.as_deref() == Some(lab.pods[i].name.as_str()) {
            continue;
        }
        signals::check()?;
        if lab.pods[i].gateway.is_some() {
            prepare_gateway(lab, topo, &lab.pods[i])?;
            let pid = start_app(lab, &lab.pods[i])?;
            lab.pods[i].app_pid = Some(pid);
            lab.save()?;
            continue;
        }
        let spec = topo
            .pods
            .iter()
            .find(|s| s.name == lab.pods[i].template)
            .context("pod template vanished")?;
        if lab.pods[i].sidecar {
            run_init(lab, i, &spec.init_args)?;
            let pid = start_sidecar(lab, &lab.pods[i])?;
            lab.pods[i].sidecar_pid = Some(pid);
            lab.save()?;
        }
        let pid = start_app(lab, &lab.pods[i])?;
        lab.pods[i].app_pid = Some(pid);
        lab.save()?;
    }
    wait_ready(lab, topo, timeout)?;
    for i in 0..lab.pods.len() {
        signals::check()?;
        let host_port = lab.pods[i].gateway.as_ref().and_then(|g| g.host_port);
        if let Some(host_port) = host_port {
            let pid = crate::forward::spawn(lab, &lab.pods[i], host_port)?;
            if let Some(g) = lab.pods[i].gateway.as_mut() {
                g.forward_pid = Some(pid);
            }
            lab.save()?;
        }
    }
    Ok(())
}

fn create_bridge(lab: &LabState) -> Result<()> {
    let ns = &lab.bridge_netns;
    netns::add(ns)?;
    netns::ip_in(ns, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(
        ns,
        &[
            "addr",
            "add",
            &format!("{}/16", addr::GATEWAY_V4),
            "dev",
            "br0",
        ],
    )?;
    if lab.ipv6 {
        netns::ip_in(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/64", addr::gateway_v6()),
                "dev",
                "br0",
                "nodad",
            ],
        )?;
    }
    netns::ip_in(ns, &["link", "set", "br0", "up"])?;
    Ok(())
}

fn create_pod_network(lab: &LabState, i: usize) -> Result<()> {
    let pod = &lab.pods[i];
    let ns = &pod.netns;
    netns::add(ns)?;
    let veth = format!("p{i}");
    netns::ip_in(
        &lab.bridge_netns,
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
    )?;
    netns::ip_in(
        &lab.bridge_netns,
        &["link", "set", &veth, "master", "br0", "up"],
    )?;
    netns::ip_in(
        ns,
        &["addr", "add", &format!("{}/16", pod.ip), "dev", "eth0"],
    )?;
    if let Some(v6) = pod.ipv6 {
        netns::ip_in(
            ns,
            &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"],
        )?;
    }
    netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
    netns::ip_in(
        ns,
        &[
            "route",
            "add",
            "default",
            "via",
            &addr::GATEWAY_V4.to_string(),
        ],
    )?;
    if lab.ipv6 {
        netns::ip_in(
            ns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addr::gateway_v6().to_string(),
            ],
        )?;
    }
    // Apps run unprivileged but may want port 80, as they could in a container.
    netns::sysctl(ns, "net.ipv4.ip_unprivileged_port_start", "0")?;
    let etc = netns::etc_dir(ns);
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("hosts"), hosts_file(lab, pod))?;
    let home = state::pod_dir(&lab.name, &pod.name);
    std::fs::create_dir_all(&home)?;
    nix::unistd::chown(&home, Some(pod.app_uid.into()), Some(pod.app_uid.into()))?;
    Ok(())
}

fn pod_env(pod: &PodState) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("POD_NAME".into(), pod.name.clone());
    env.insert("POD_NAMESPACE".into(), pod.namespace.clone());
    env.insert("POD_IP".into(), pod.ip.to_string());
    if let Some(v6) = pod.ipv6 {
        env.insert("POD_IPV6".into(), v6.to_string());
    }
    env.insert("POD_SERVICE_ACCOUNT".into(), pod.service_account.clone());
    // gRPC's default resolver (c-ares) ignores the pod's hosts file; getaddrinfo reads it.
    env.insert("GRPC_DNS_RESOLVER".into(), "native".into());
    for (var, value) in [
        ("POD_ZONE", &pod.zone),
        ("POD_REGION", &pod.region),
        ("POD_CLOUD", &pod.cloud),
    ] {
        if let Some(v) = value {
            env.insert(var.into(), v.clone());
        }
    }
    env
}

fn run_init(lab: &LabState, i: usize, extra: &[String]) -> Result<()> {
    let pod = &lab.pods[i];
    let mut argv = vec![
        state::bin_dir(&lab.name)
            .join("muon-init")
            .display()
            .to_string(),
        "--ipv6".into(),
        if lab.ipv6 { "on" } else { "off" }.into(),
    ];
    argv.extend(extra.iter().cloned());
    let env = BTreeMap::new();
    process::run_to_end(&Spawn {
        netns: &pod.netns,
        uid: None,
        argv: &argv,
        env: &env,
        cwd: Path::new("/"),
        log: &state::log_file(&lab.name, &pod.name, "init"),
    })
    .with_context(|| format!("capture setup in pod {}", pod.name))
}

fn start_sidecar(lab: &LabState, pod: &PodState) -> Result<i32> {
    let mut argv = vec![
        state::bin_dir(&lab.name)
            .join("muon-proxy")
            .display()
            .to_string(),
        "--log-format".into(),
        "json".into(),
    ];
    match lab.control_plane_pod() {
        Some(cp) => {
            let dir = control::proxy_state_dir(&lab.name, &pod.name)?;
            argv.extend(control::proxy_flags(&lab.name, cp, &pod.name));
            argv.push("--state-dir".into());
            argv.push(dir.display().to_string());
        }
        None => {
            argv.push("--table-file".into());
            argv.push(state::table_file(&lab.name).display().to_string());
        }
    }
    argv.extend(pod.proxy_args.iter().cloned());
    process::spawn(&Spawn {
        netns: &pod.netns,
        uid: Some(ports::PROXY_UID),
        argv: &argv,
        env: &pod_env(pod),
        cwd: Path::new("/"),
        log: &state::log_file(&lab.name, &pod.name, "sidecar"),
    })
}

fn start_app(lab: &LabState, pod: &PodState) -> Result<i32> {
    // A pod without a command still exists, like a pause container: clients exec into it.
    let argv: Vec<String> = if pod.command.is_empty() {
        vec!["sleep".into(), "infinity".into()]
    } else {
        pod.command.clone()
    };
    let mut env = pod_env(pod);
    let home = state::pod_dir(&lab.name, &pod.name);
    env.insert("HOME".into(), home.display().to_string());
    env.extend(pod.env.clone());
    process::spawn(&Spawn {
        netns: &pod.netns,
        uid: Some(pod.app_uid),
        argv: &argv,
        env: &env,
        cwd: &home,
        log: &state::log_file(&lab.name, &pod.name, "app"),
    })
}

fn sidecar_ready(pod: &PodState) -> bool {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports::HEALTH);
    matches!(netns::http_get_in(&pod.netns, addr, "/ready"), Ok((200, _)))
}

/// Does the sidecar's table hold every service of the lab with all its endpoints? A sidecar
/// is ready after its first sync, which may come from a snapshot the control plane computed
/// before the lab's registrations (pushes are debounced); `up` returns only once the mesh as
/// registered has reached every sidecar.
fn sidecar_has_every_service(lab: &LabState, pod: &PodState) -> bool {
    if lab.control_plane.is_none() {
        return true; // the table file was written whole before any sidecar started
    }
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports::ADMIN);
    let Ok((200, body)) = netns::http_get_in(&pod.netns, addr, "/config_dump") else {
        return false;
    };
    let Ok(dump) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    let have: BTreeMap<(String, String), usize> = dump["table"]["services"]
        .as_array()
        .map(|services| {
            services
                .iter()
                .map(|s| {
                    let key = (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["namespace"].as_str().unwrap_or_default().to_string(),
                    );
                    (key, s["endpoints"].as_array().map_or(0, Vec::len))
                })
                .collect()
        })
        .unwrap_or_default();
    lab.services.iter().all(|svc| {
        have.get(&(svc.name.clone(), svc.namespace.clone())) == Some(&svc.endpoints.len())
    })
}

/// Waits until every sidecar says ready and every service's target ports accept connections
/// on every pod behind it; fails early, with the log's last lines, when a process dies.
fn wait_ready(lab: &LabState, topo: &Topology, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<(usize, Option<SocketAddr>)> = Vec::new();
    for (i, pod) in lab.pods.iter().enumerate() {
        if pod.sidecar || pod.gateway.is_some() {
            pending.push((i, None));
        }
        if let Some(g) = &pod.gateway {
            pending.push((i, Some(SocketAddr::new(IpAddr::V4(pod.ip), g.port))));
        }
        for (spec, st) in topo.services.iter().zip(&lab.services) {
            if st.endpoints.contains(&pod.name) {
                for p in &spec.ports {
                    pending.push((
                        i,
                        Some(SocketAddr::new(IpAddr::V4(pod.ip), p.target_port())),
                    ));
                }
            }
        }
    }
    loop {
        signals::check()?;
        process::reap_children();
        for &(i, _) in &pending {
            let pod = &lab.pods[i];
            for (what, pid) in [("sidecar", pod.sidecar_pid), ("app", pod.app_pid)] {
                if let Some(pid) = pid {
                    if !process::alive(pid) {
                        let log = state::log_file(&lab.name, &pod.name, what);
                        bail!(
                            "the {what} of pod {} exited during start-up; last lines of {}:\n{}",
                            pod.name,
                            log.display(),
                            process::tail(&log, 15)
                        );
                    }
                }
            }
        }
        pending.retain(|&(i, port)| {
            let pod = &lab.pods[i];
            match port {
                None => !(sidecar_ready(pod) && sidecar_has_every_service(lab, pod)),
                // The probe runs as root, whose connections to the pod's own IP muon-init
                // leaves uncaptured, so this checks the app itself.
                Some(addr) => !netns::can_connect_in(&pod.netns, addr),
            }
        });
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let what: Vec<String> = pending
                .iter()
                .map(|&(i, port)| match port {
                    None => format!("sidecar of {} not ready", lab.pods[i].name),
                    Some(a) => format!("{} not listening on {a}", lab.pods[i].name),
                })
                .collect();
            bail!("not ready after {:?}: {}", timeout, what.join("; "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub processes: usize,
}

/// How long `down` waits for the lab's `up` to remove what it made before doing it itself.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(15);

/// Removes every namespace, process and file of lab `name`, with or without its state file.
pub fn down(name: &str) -> Result<DownReport> {
    check_name(name, 20).map_err(|r| anyhow::anyhow!("lab name {name:?}: {r}"))?;
    let mut report = DownReport::default();
    let state = LabState::load(name).ok();
    let bridge = bridge_netns(name);
    let pod_prefix = format!("muon-{name}.");
    let supervisor = state
        .as_ref()
        .and_then(|s| s.supervisor_pid)
        .filter(|&pid| pid != std::process::id() as i32 && process::is_supervisor(pid));
    if let Some(pid) = supervisor {
        // A `lab up` is still bringing the lab up, or supervises it in the foreground. Told
        // to stop, it removes what it made; waiting for it means nothing is created behind
        // this `down`'s back. What is left after the grace period is removed below.
        let before = netns::list_matching(&bridge, &pod_prefix);
        report.processes = before.iter().map(|ns| netns::pids(ns).len()).sum();
        report.namespaces = before;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + SUPERVISOR_GRACE;
        while process::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let namespaces = netns::list_matching(&bridge, &pod_prefix);
    // Pods first, all at once: stopping a hundred processes takes one grace period, not a hundred.
    let pids: Vec<i32> = namespaces.iter().flat_map(|ns| netns::pids(ns)).collect();
    process::stop(&pids, Duration::from_secs(3));
    report.processes = report.processes.max(pids.len());
    report.namespaces.retain(|ns| !namespaces.contains(ns));
    let mut errors = Vec::new();
    for ns in &namespaces {
        match netns::delete(ns) {
            Ok(()) => report.namespaces.push(ns.clone()),
            Err(e) => errors.push(format!("{ns}: {e:#}")),
        }
    }
    // /etc/netns entries whose namespace is already gone.
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for entry in dir.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if n == bridge || n.starts_with(&pod_prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = state::lab_dir(name);
    if dir.exists() {
        // Another `down` (the lab's own `up`, stopping) may be removing it at the same time.
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if dir.exists() {
                errors.push(format!("{}: {e}", dir.display()));
            }
        }
    }
    if !errors.is_empty() {
        bail!(
            "lab {name} was not removed completely:\n{}",
            errors.join("\n")
        );
    }
    Ok(report)
}

/// One pod's health, as `lab status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(flatten)]
    pub pod: PodState,
    pub app_running: bool,
    /// "ready", "not-ready", "down", or "none" for pods outside the mesh.
    pub sidecar: &'static str,
}

/// Whether a lab is whole, as `lab status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabPhase {
    /// `up` is still bringing it up.
    Starting,
    /// `up` finished: every pod was ready.
    Up,
    /// `up` never finished and is gone (killed, or the machine's state was lost): what is
    /// there may be half made. `lab down` removes it.
    Incomplete,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabStatus {
    pub name: String,
    pub phase: LabPhase,
    /// Why the lab is incomplete, and what to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The namespaces of this lab that exist now.
    pub namespaces: Vec<String>,
    pub ipv6: bool,
    /// Unknown when the state file is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology_file: Option<String>,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceState>,
}

/// The status of lab `name`: what its state file records, checked against the processes and
/// namespaces that exist. A lab whose state directory exists but whose `up` never finished is
/// `incomplete`, also without a state file (the `up` was killed before it wrote one).
pub fn status(name: &str) -> Result<LabStatus> {
    check_name(name, 20).map_err(|r| anyhow::anyhow!("lab name {name:?}: {r}"))?;
    let namespaces = netns::list_matching(&bridge_netns(name), &format!("muon-{name}."));
    let lab = match LabState::load(name) {
        Ok(lab) => lab,
        Err(e) if state::lab_dir(name).exists() || !namespaces.is_empty() => {
            let starting = state::lab_dir(name)
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(5));
            return Ok(LabStatus {
                name: name.to_string(),
                // An `up` writes its state file right after claiming the directory: a young
                // directory without one is most likely an `up` at work.
                phase: if starting {
                    LabPhase::Starting
                } else {
                    LabPhase::Incomplete
                },
                problem: (!starting).then(|| {
                    let why = match state::state_file(name).exists() {
                        true => format!("{e:#}"),
                        false => "it has no state file: its `lab up` ended before writing one"
                            .to_string(),
                    };
                    format!("{why}. Remove what is left: muonctl lab down {name}")
                }),
                namespaces,
                ipv6: false,
                topology_file: None,
                pods: Vec::new(),
                services: Vec::new(),
            });
        }
        Err(e) => return Err(e),
    };
    // While starting, the recorded pid is the `up` at work.
    let up_running = lab
        .supervisor_pid
        .is_some_and(|pid| pid == std::process::id() as i32 || process::is_supervisor(pid));
    let (phase, problem) = match lab.phase {
        Phase::Up => (LabPhase::Up, None),
        Phase::Starting if up_running => (LabPhase::Starting, None),
        Phase::Starting => (
            LabPhase::Incomplete,
            Some(format!(
                "its `lab up`{} ended before the lab was ready. Remove what is left: muonctl lab down {name}",
                lab.supervisor_pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            )),
        ),
    };
    let pods = lab
        .pods
        .iter()
        .map(|p| PodStatus {
            pod: p.clone(),
            app_running: p.app_pid.is_some_and(process::alive),
            sidecar: match (p.sidecar, p.sidecar_pid.is_some_and(process::alive)) {
                (false, _) => "none",
                (true, false) => "down",
                (true, true) if sidecar_ready(p) => "ready",
                (true, true) => "not-ready",
            },
        })
        .collect();
    Ok(LabStatus {
        name: lab.name,
        phase,
        problem,
        namespaces,
        ipv6: lab.ipv6,
        topology_file: Some(lab.topology_file),
        pods,
        services: lab.services,
    })
}

/// Runs a command inside a pod, as the app's user unless `uid` says otherwise, with the pod's
/// environment and /etc/hosts; returns its exit code.
pub fn exec(name: &str, pod: &str, argv: &[String], uid: Option<u32>) -> Result<i32> {
    let lab = LabState::load(name)?;
    let pod = lab.pod(pod)?;
    let mut env = pod_env(pod);
    for keep in ["TERM", "HOME"] {
        if let Ok(v) = std::env::var(keep) {
            env.insert(keep.into(), v);
        }
    }
    let home = state::pod_dir(name, &pod.name);
    env.insert("HOME".into(), home.display().to_string());
    let uid = uid.unwrap_or(pod.app_uid);
    let status = process::command(&Spawn {
        netns: &pod.netns,
        uid: (uid != 0).then_some(uid),
        argv,
        env: &env,
        cwd: &home,
        log: Path::new("/dev/null"),
    })?
    .status()
    .with_context(|| format!("running {argv:?} in pod {}", pod.name))?;
    Ok(status.code().unwrap_or(128 + 9))
}

/// The app's (or the sidecar's) log of a pod.
pub fn logs(name: &str, pod: &str, sidecar: bool) -> Result<PathBuf> {
    let lab = LabState::load(name)?;
    let pod = lab.pod(pod)?;
    if sidecar && !pod.sidecar {
        bail!("pod {} has no sidecar (sidecar: false)", pod.name);
    }
    Ok(state::log_file(
        name,
        &pod.name,
        if sidecar { "sidecar" } else { "app" },
    ))
}

/// Stops and starts a pod's sidecar or app again (the lab's `kubectl rollout restart`), and
/// waits for the sidecar to be ready.
pub fn restart(name: &str, pod_name: &str, sidecar: bool, timeout: Duration) -> Result<()> {
    let mut lab = LabState::load(name)?;
    let pod = lab.pod(pod_name)?.clone();
    let what = if sidecar { "sidecar" } else { "app" };
    let old = if sidecar {
        if !pod.sidecar {
            bail!("pod {} has no sidecar (sidecar: false)", pod.name);
        }
        pod.sidecar_pid
    } else {
        pod.app_pid
    };
    if let Some(pid) = old.filter(|&pid| process::alive_in_netns(pid, &pod.netns)) {
        process::stop(&[pid], Duration::from_secs(5));
    }
    let pid = if sidecar {
        start_sidecar(&lab, &pod)?
    } else {
        start_app(&lab, &pod)?
    };
    if let Some(p) = lab.pod_mut(pod_name) {
        if sidecar {
            p.sidecar_pid = Some(pid);
        } else {
            p.app_pid = Some(pid);
        }
    }
    lab.save()?;
    let is_control_plane = lab.control_plane.as_deref() == Some(pod_name);
    let deadline = Instant::now() + timeout;
    loop {
        let ready = if sidecar {
            sidecar_ready(&pod)
        } else if is_control_plane {
            control::ready(&pod)
        } else {
            true
        };
        if ready {
            return Ok(());
        }
        if !process::alive(pid) {
            let log = state::log_file(name, &pod.name, what);
            bail!(
                "the {what} of {} exited; last lines:\n{}",
                pod.name,
                process::tail(&log, 15)
            );
        }
        if Instant::now() > deadline {
            bail!("the {what} of {} is not ready after {timeout:?}", pod.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a pod's app, or its sidecar (the lab's way to take a replica or a zone down): the
/// pod keeps its namespace and address, so connections to it are refused; `restart` starts
/// the process again. Returns whether a process was running.
pub fn stop(name: &str, pod_name: &str, sidecar: bool) -> Result<bool> {
    let mut lab = LabState::load(name)?;
    let pod = lab.pod(pod_name)?.clone();
    let pid = if sidecar {
        if !pod.sidecar {
            bail!("pod {} has no sidecar (sidecar: false)", pod.name);
        }
        pod.sidecar_pid
    } else {
        pod.app_pid
    };
    let running = pid.filter(|&pid| process::alive_in_netns(pid, &pod.netns));
    if let Some(pid) = running {
        process::stop(&[pid], Duration::from_secs(5));
    }
    if let Some(p) = lab.pod_mut(pod_name) {
        match sidecar {
            true => p.sidecar_pid = None,
            false => p.app_pid = None,
        }
    }
    lab.save()?;
    Ok(running.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> (LabState, Topology) {
        let topo = Topology::parse(
            "t.yaml",
            "pods:\n  - name: web\n    labels: {app: web}\n    replicas: 2\n  - name: other\n    namespace: shop\n\
             services:\n  - name: web\n    selector: {app: web}\n    ports: [{port: 80, targetPort: 8080}]\n",
        )
        .unwrap();
        let opts = UpOptions {
            topology: "t.yaml".into(),
            name: None,
            bin_dir: None,
            ready_timeout: Duration::from_secs(1),
            supervisor: false,
        };
        (plan("t", &topo, true, &opts).unwrap(), topo)
    }

    #[test]
    fn service_names_win_over_a_pod_of_the_same_name() {
        let (lab, _) = lab();
        let hosts = hosts_file(&lab, lab.pod("web-0").unwrap());
        let webs: Vec<&str> = hosts
            .lines()
            .filter(|l| l.split_whitespace().skip(1).any(|n| n == "web"))
            .collect();
        assert_eq!(
            webs,
            ["198.19.0.1\tweb.default.svc.cluster.local web.default web"]
        );
        assert!(
            hosts.contains("198.18.0.4\tweb-1\n") || hosts.contains("\tweb-0\n"),
            "{hosts}"
        );
        // In another namespace only the qualified names resolve.
        let other = hosts_file(&lab, lab.pod("other").unwrap());
        assert!(
            other.contains("198.19.0.1\tweb.default.svc.cluster.local web.default\n"),
            "{other}"
        );
    }

    #[test]
    fn the_table_maps_each_vip_to_the_selected_pods_and_target_port() {
        let (lab, topo) = lab();
        let table = service_table(&lab, &topo);
        table.validate().unwrap();
        let svc = &table.services[0];
        assert_eq!(svc.vips.len(), 2, "IPv4 and IPv6 virtual IPs");
        assert_eq!(svc.ports[0].target_port, 8080);
        let pods: Vec<&str> = svc.endpoints.iter().map(|e| e.pod.as_str()).collect();
        assert_eq!(pods, ["web-0", "web-1"]);
    }

    #[test]
    fn the_control_plane_gets_the_first_address_and_registers_every_other_pod() {
        let (lab, topo) = lab();
        assert_eq!(
            lab.control_plane_pod().unwrap().ip.to_string(),
            "198.18.0.2"
        );
        let objects = control::objects(&lab, &topo);
        let kinds: Vec<(String, String)> = objects
            .iter()
            .map(|o| (o.kind.clone(), o.metadata.as_ref().unwrap().name.clone()))
            .collect();
        let want = [
            ("Service", "web"),
            ("Workload", "web-0"),
            ("Workload", "web-1"),
            ("Workload", "other"),
        ];
        assert_eq!(kinds, want.map(|(k, n)| (k.to_string(), n.to_string())));
        let web = muon_api::json::json_from_struct(objects[0].spec.as_ref().unwrap());
        assert_eq!(web["ports"][0]["targetPort"], 8080);
        assert_eq!(web["vips"][0], "198.19.0.1");
        let w0 = muon_api::json::json_from_struct(objects[1].spec.as_ref().unwrap());
        assert_eq!(w0["address"], "198.18.0.3");
        assert_eq!(w0["serviceAccount"], "web");
    }

    #[test]
    fn default_lab_name_comes_from_the_file_name() {
        assert_eq!(default_name(Path::new("/x/My_Shop.yaml")), "my-shop");
        assert_eq!(default_name(Path::new("/x/___.yaml")), "lab");
    }
}
