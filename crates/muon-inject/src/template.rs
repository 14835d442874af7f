//! What every injection shares: the image, the control plane's address, the default sidecar
//! mode, and the names and paths the control plane, muon-init and muon-proxy agree on.

/// The registry the images are published to by default.
pub const DEFAULT_HUB: &str = "ghcr.io/muon-mesh";
/// The image tag by default: this build's version.
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");
/// Where the sidecars reach the control plane by default (its Service in `muon-system`).
pub const DEFAULT_CONTROL_PLANE: &str = "muon-control.muon-system.svc:15010";

/// Names of what injection adds.
pub const PROXY_CONTAINER: &str = "muon-proxy";
pub const INIT_CONTAINER: &str = "muon-init";
pub const TOKEN_VOLUME: &str = "muon-token";
pub const CA_VOLUME: &str = "muon-ca-root";
pub const STATE_VOLUME: &str = "muon-state";
/// The ConfigMap, in the pod's namespace, holding the mesh's trust bundle (key [`CA_KEY`]):
/// the roots the control plane's certificate chains to. The control plane publishes it.
pub const CA_CONFIGMAP: &str = "muon-ca-root";
pub const CA_KEY: &str = "ca.crt";

/// Paths inside the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/muon/tokens";
/// The projected ServiceAccount token's audience (and its file name under [`TOKEN_DIR`]).
pub const TOKEN_AUDIENCE: &str = "muon-ca";
pub const CA_DIR: &str = "/var/run/secrets/muon/ca";
pub const STATE_DIR: &str = "/var/lib/muon-proxy";
/// The binaries in the proxy image (which holds both).
pub const PROXY_BIN: &str = "/usr/local/bin/muon-proxy";
pub const INIT_BIN: &str = "/usr/local/bin/muon-init";

/// Annotations and labels users set.
pub const ANNOTATION_INJECT: &str = "muon.io/inject";
pub const ANNOTATION_STATUS: &str = "muon.io/status";
pub const ANNOTATION_SIDECAR_MODE: &str = "muon.io/sidecar-mode";
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "muon.io/exclude-inbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "muon.io/exclude-outbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "muon.io/exclude-outbound-cidrs";
pub const ANNOTATION_OPAQUE_PORTS: &str = "muon.io/opaque-ports";
pub const ANNOTATION_PROXY_CPU: &str = "muon.io/proxy-cpu";
pub const ANNOTATION_PROXY_MEMORY: &str = "muon.io/proxy-memory";
pub const ANNOTATION_PROXY_LOG_LEVEL: &str = "muon.io/proxy-log-level";

/// How the sidecar runs beside the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): started, and ready,
    /// before the app's containers; stopped after them; a Job's pod completes.
    #[default]
    Native,
    /// The first app container, whose postStart hook holds the next containers until the
    /// proxy is ready; a preStop pause keeps it serving while the app finishes.
    Classic,
}

impl SidecarMode {
    pub fn parse(s: &str) -> Result<SidecarMode, String> {
        match s.trim() {
            "native" => Ok(SidecarMode::Native),
            "classic" => Ok(SidecarMode::Classic),
            other => Err(format!("{other:?} is not native or classic")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
        }
    }
}

/// The settings of one injector (the CLI's flags, or the control plane's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The image holding muon-proxy and muon-init.
    pub proxy_image: String,
    /// `host:port` of the control plane's gRPC port, as sidecars reach it (over TLS).
    pub control_plane: String,
    /// The mode unless a pod's `muon.io/sidecar-mode` says otherwise.
    pub mode: SidecarMode,
}

impl Default for Template {
    fn default() -> Self {
        Template {
            proxy_image: proxy_image(DEFAULT_HUB, DEFAULT_TAG),
            control_plane: DEFAULT_CONTROL_PLANE.to_string(),
            mode: SidecarMode::Native,
        }
    }
}

/// `<hub>/muon-proxy:<tag>`.
pub fn proxy_image(hub: &str, tag: &str) -> String {
    format!("{}/muon-proxy:{tag}", hub.trim_end_matches('/'))
}

impl Template {
    /// Checks what a pod spec would carry: an image reference without blanks, a control plane
    /// `host:port` (with an optional `https://`).
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.proxy_image.trim().is_empty() || self.proxy_image.contains(char::is_whitespace) {
            problems.push(format!(
                "proxy image {:?} is not an image reference",
                self.proxy_image
            ));
        }
        let addr = self
            .control_plane
            .strip_prefix("https://")
            .unwrap_or(&self.control_plane);
        let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || addr.contains(['/', ' ']) {
            problems.push(format!(
                "control plane {:?} is not host:port (e.g. {DEFAULT_CONTROL_PLANE})",
                self.control_plane
            ));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }

    /// The sidecar's `--control-plane`: always TLS.
    pub fn control_plane_url(&self) -> String {
        match self.control_plane.strip_prefix("https://") {
            Some(_) => self.control_plane.clone(),
            None => format!("https://{}", self.control_plane),
        }
    }
}
