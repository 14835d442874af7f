//! The lab's control plane: `muon-control` in a pod of its own (`muon-control`, namespace
//! `muon-system`, outside the mesh), and the registration of every pod and service through
//! its management API, the way any other source of workloads would do it.
//!
//! The lab runs in the host's namespace, where pod addresses do not exist; gRPC calls run on a
//! thread that has joined the control plane pod's namespace, with a runtime of its own.

use crate::addr;
use crate::netns;
use crate::state::{self, LabState, PodState};
use crate::topology::{Topology, CONTROL_PLANE_POD};
use anyhow::{bail, Context, Result};
use muon_api::json::struct_from_json;
use muon_api::v1::management_client::ManagementClient;
use muon_api::v1::{ApplyRequest, Metadata, Object};
use muon_core::ports;
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The control plane's metrics and readiness port.
pub const METRICS_PORT: u16 = 15014;
pub const NAMESPACE: &str = "muon-system";

/// The control plane pod: the first address of the lab.
pub fn plan_pod(lab: &str, ipv6: bool) -> Result<PodState> {
    let data = state::lab_dir(lab).join("control");
    let bin = state::bin_dir(lab).join("muon-control");
    Ok(PodState {
        name: CONTROL_PLANE_POD.into(),
        template: CONTROL_PLANE_POD.into(),
        namespace: NAMESPACE.into(),
        service_account: CONTROL_PLANE_POD.into(),
        netns: crate::lab::pod_netns(lab, CONTROL_PLANE_POD),
        ip: addr::pod_v4(0)?,
        ipv6: ipv6.then(|| addr::pod_v6(0)),
        zone: None,
        region: None,
        cloud: None,
        labels: BTreeMap::from([("app".into(), CONTROL_PLANE_POD.into())]),
        app_uid: ports::CONTROL_UID,
        sidecar: false,
        command: vec![
            bin.display().to_string(),
            "--grpc-addr".into(),
            format!("0.0.0.0:{}", ports::CONTROL),
            "--metrics-addr".into(),
            format!("0.0.0.0:{METRICS_PORT}"),
            "--data-dir".into(),
            data.display().to_string(),
            "--log-format".into(),
            "json".into(),
        ],
        env: BTreeMap::new(),
        proxy_args: Vec::new(),
        app_pid: None,
        sidecar_pid: None,
        gateway: None,
    })
}

/// Creates the control plane's data directory, owned by its user.
pub fn prepare(lab: &LabState) -> Result<()> {
    let data = state::lab_dir(&lab.name).join("control");
    std::fs::create_dir_all(&data)?;
    nix::unistd::chown(
        &data,
        Some(ports::CONTROL_UID.into()),
        Some(ports::CONTROL_UID.into()),
    )?;
    Ok(())
}

/// The administrator credential the lab's control plane wrote (for `muonctl --lab`).
pub fn admin_dir(lab: &str) -> std::path::PathBuf {
    state::lab_dir(lab).join("control").join("admin")
}

/// The mesh's trust bundle, as the lab's control plane wrote it (every sidecar's
/// `--ca-bundle`).
pub fn trust_bundle(lab: &str) -> std::path::PathBuf {
    state::lab_dir(lab)
        .join("control")
        .join("ca")
        .join("trust-bundle.pem")
}

/// The control plane's TLS address in the lab.
pub fn url(cp: &PodState) -> String {
    format!("https://{}:{}", cp.ip, ports::CONTROL)
}

/// A management channel to the lab's control plane, as its administrator.
async fn admin_channel(lab: &str, addr: &str) -> Result<tonic::transport::Channel> {
    let tls = muon_api::connect::admin_tls(&admin_dir(lab)).map_err(anyhow::Error::msg)?;
    let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())?
        .connect_timeout(Duration::from_secs(5));
    muon_api::connect::channel(endpoint, Some(tls))
        .await
        .with_context(|| format!("connecting to muon-control at {addr}"))
}

/// How long a sidecar's join token lasts: the lab's life, give or take (a restarted sidecar
/// asks for its first certificate with it again).
const TOKEN_TTL_S: u32 = 30 * 24 * 3600;

/// Writes a join token for each of `pods` (a sidecar or a gateway) into its proxy state
/// directory, readable by the sidecar's user only.
pub fn write_join_tokens(lab: &LabState, pods: Vec<PodState>) -> Result<()> {
    let name = lab.name.clone();
    block_on_in_lab(&lab.name, move |addr| async move {
        let mut client =
            muon_api::v1::identity_client::IdentityClient::new(admin_channel(&name, &addr).await?);
        for pod in pods {
            let token = client
                .create_join_token(muon_api::v1::CreateJoinTokenRequest {
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    ttl_seconds: TOKEN_TTL_S,
                })
                .await
                .map_err(|s| anyhow::anyhow!("a join token for {}: {}", pod.name, s.message()))?
                .into_inner()
                .token;
            proxy_state_dir(&name, &pod.name)?;
            let file = join_token_file(&name, &pod.name);
            state::write_atomic(&file, token.as_bytes())?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
            nix::unistd::chown(
                &file,
                Some(ports::PROXY_UID.into()),
                Some(ports::PROXY_UID.into()),
            )?;
        }
        Ok(())
    })
}

/// Where a pod's sidecar finds its join token.
pub fn join_token_file(lab: &str, pod: &str) -> std::path::PathBuf {
    state::proxy_state_dir(lab, pod).join("join-token")
}

/// The flags that make a proxy of this lab talk TLS to its control plane and get a mesh
/// certificate.
pub fn proxy_flags(lab: &str, cp: &PodState, pod: &str) -> Vec<String> {
    vec![
        "--control-plane".into(),
        url(cp),
        "--ca-bundle".into(),
        trust_bundle(lab).display().to_string(),
        "--join-token-file".into(),
        join_token_file(lab, pod).display().to_string(),
    ]
}

pub fn ready(pod: &PodState) -> bool {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);
    matches!(netns::http_get_in(&pod.netns, addr, "/ready"), Ok((200, _)))
}

pub fn wait_ready(lab: &LabState, pod: &PodState, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready(pod) {
        crate::signals::check()?;
        if !pod.app_pid.is_some_and(crate::process::alive) {
            let log = state::log_file(&lab.name, &pod.name, "app");
            bail!(
                "muon-control exited during start-up; last lines of {}:\n{}",
                log.display(),
                crate::process::tail(&log, 15)
            );
        }
        if Instant::now() > deadline {
            bail!("muon-control is not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `f` with the lab's control plane address, inside its pod's namespace.
pub fn block_on_in_lab<F, Fut, T>(lab: &str, f: F) -> Result<T>
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let state = LabState::load(lab)?;
    let pod = state
        .control_plane_pod()
        .with_context(|| format!("lab {lab} has no control plane (controlPlane: false)"))?;
    let addr = format!("http://{}:{}", pod.ip, ports::CONTROL);
    netns::in_netns(&pod.netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f(addr))
    })
}

/// The lab's pods and services as management objects: a `Service` per topology service, a
/// `Workload` per pod.
pub fn objects(lab: &LabState, topo: &Topology) -> Vec<Object> {
    let mut out = Vec::new();
    for (spec, st) in topo.services.iter().zip(&lab.services) {
        let vips: Vec<String> = std::iter::once(st.vip.to_string())
            .chain(st.vip6.map(|v| v.to_string()))
            .collect();
        let ports: Vec<serde_json::Value> = spec
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({"port": p.port, "targetPort": p.target_port()});
                if let Some(proto) = p.protocol {
                    port["protocol"] = json!(proto.as_str());
                }
                if let Some(n) = &p.name {
                    port["name"] = json!(n);
                }
                port
            })
            .collect();
        out.push(object(
            "Service",
            &spec.name,
            &spec.namespace,
            BTreeMap::new(),
            json!({"vips": vips, "ports": ports, "selector": spec.selector}),
        ));
        if let Some(traffic) = &spec.traffic {
            let mut policy = serde_json::to_value(traffic).unwrap_or_default();
            policy["targetRefs"] = json!([{"kind": "Service", "name": spec.name}]);
            out.push(object(
                "TrafficPolicy",
                &spec.name,
                &spec.namespace,
                BTreeMap::new(),
                policy,
            ));
        }
    }
    if let Some(g) = &topo.gateway {
        let protocol = if g.tls.is_some() { "HTTPS" } else { "HTTP" };
        out.push(Object {
            api_version: muon_core::resource::GATEWAY_API_VERSION.into(),
            ..object(
                "Gateway",
                &g.name,
                &g.namespace,
                BTreeMap::new(),
                json!({
                    "gatewayClassName": "muon",
                    "listeners": [{"name": protocol.to_ascii_lowercase(), "port": g.port(), "protocol": protocol}],
                }),
            )
        });
    }
    for pod in lab
        .pods
        .iter()
        .filter(|p| lab.control_plane.as_deref() != Some(p.name.as_str()) && p.gateway.is_none())
    {
        let mut locality = serde_json::Map::new();
        for (key, value) in [
            ("zone", &pod.zone),
            ("region", &pod.region),
            ("cloud", &pod.cloud),
        ] {
            if let Some(v) = value {
                locality.insert(key.into(), json!(v));
            }
        }
        out.push(object(
            "Workload",
            &pod.name,
            &pod.namespace,
            pod.labels.clone(),
            json!({
                "address": pod.ip.to_string(),
                "serviceAccount": pod.service_account,
                "locality": locality,
                "meshed": pod.sidecar,
            }),
        ));
    }
    out
}

fn object(
    kind: &str,
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    spec: serde_json::Value,
) -> Object {
    Object {
        api_version: "muon.io/v1alpha1".into(),
        kind: kind.into(),
        metadata: Some(Metadata {
            name: name.into(),
            namespace: namespace.into(),
            labels: labels.into_iter().collect(),
            ..Default::default()
        }),
        spec: struct_from_json(&spec),
    }
}

/// How long registering may take: the control plane answered /ready just before, so this
/// only bounds a control plane that hangs (and a stop signal meanwhile is seen after it).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers every pod and service with the control plane, in one all-or-nothing apply.
pub fn register(lab: &LabState, topo: &Topology) -> Result<()> {
    let objects = objects(lab, topo);
    let lab_name = lab.name.clone();
    block_on_in_lab(&lab.name, move |addr| async move {
        let call = async {
            let mut client = ManagementClient::new(admin_channel(&lab_name, &addr).await?);
            client
                .apply(ApplyRequest {
                    objects,
                    dry_run: false,
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!("registering the lab's pods and services: {}", s.message())
                })?;
            Ok(())
        };
        tokio::time::timeout(REGISTER_TIMEOUT, call)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "registering the lab's pods and services: muon-control at {addr} did not answer within {REGISTER_TIMEOUT:?}"
                )
            })?
    })
}

/// The sidecar's state directory (its join token, its discovery cache), created and owned by
/// the proxy's user.
pub fn proxy_state_dir(lab: &str, pod: &str) -> Result<std::path::PathBuf> {
    let dir = state::proxy_state_dir(lab, pod);
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(
        &dir,
        Some(ports::PROXY_UID.into()),
        Some(ports::PROXY_UID.into()),
    )?;
    Ok(dir)
}
