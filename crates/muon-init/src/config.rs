//! Flags and their validation: the one place where muon-init's configuration is parsed.
//!
//! [`Args`] is what clap reads from the command line and `MUON_INIT_*` environment variables.
//! Every value arrives as a string so that [`Config::from_args`] can check all of them and
//! report every problem at once, instead of clap stopping at the first bad number.
//! [`Config`] is the validated, typed result that rule generation works from.

use std::fmt;

use clap::Parser;
use muon_core::ports;

/// Command-line flags of `muon-init`. Each flag can also be set through the environment
/// variable named in its help (flags win over the environment).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "muon-init",
    version,
    about = "Programs Muon's iptables capture rules (nat table, chains MUON_*) in the current \
             network namespace so a pod's TCP traffic goes through its sidecar."
)]
pub struct Args {
    /// UID the proxy runs as; its own connections are never captured.
    #[arg(long, env = "MUON_INIT_PROXY_UID", default_value_t = ports::PROXY_UID.to_string())]
    pub proxy_uid: String,

    /// GID the proxy runs as [default: the proxy UID].
    #[arg(long, env = "MUON_INIT_PROXY_GID")]
    pub proxy_gid: Option<String>,

    /// Port the proxy's outbound listener captures on.
    #[arg(long, env = "MUON_INIT_OUTBOUND_PORT", default_value_t = ports::OUTBOUND.to_string())]
    pub outbound_port: String,

    /// Port the proxy's inbound listener captures on.
    #[arg(long, env = "MUON_INIT_INBOUND_PORT", default_value_t = ports::INBOUND.to_string())]
    pub inbound_port: String,

    /// Proxy health/metrics port; never captured inbound.
    #[arg(long, env = "MUON_INIT_HEALTH_PORT", default_value_t = ports::HEALTH.to_string())]
    pub health_port: String,

    /// Proxy admin port; never captured inbound.
    #[arg(long, env = "MUON_INIT_ADMIN_PORT", default_value_t = ports::ADMIN.to_string())]
    pub admin_port: String,

    /// Inbound ports to capture: `*` for all, a comma list, or empty for none.
    #[arg(long, env = "MUON_INIT_INCLUDE_INBOUND_PORTS", default_value = "*")]
    pub include_inbound_ports: String,

    /// Comma list of inbound ports never captured.
    #[arg(long, env = "MUON_INIT_EXCLUDE_INBOUND_PORTS", default_value = "")]
    pub exclude_inbound_ports: String,

    /// Comma list of outbound destination ports never captured.
    #[arg(long, env = "MUON_INIT_EXCLUDE_OUTBOUND_PORTS", default_value = "")]
    pub exclude_outbound_ports: String,

    /// Outbound destinations to capture: `*` for all, a comma list of CIDRs (IPv4 and/or
    /// IPv6), or empty for none.
    #[arg(long, env = "MUON_INIT_INCLUDE_OUTBOUND_CIDRS", default_value = "*")]
    pub include_outbound_cidrs: String,

    /// Comma list of outbound destination CIDRs never captured.
    #[arg(long, env = "MUON_INIT_EXCLUDE_OUTBOUND_CIDRS", default_value = "")]
    pub exclude_outbound_cidrs: String,

    /// IPv6 capture: on, off, or auto (on when the kernel has IPv6 and ip6tables-restore exists).
    #[arg(long, env = "MUON_INIT_IPV6", default_value = "auto")]
    pub ipv6: String,

    /// Which iptables binaries to use: auto (iptables-restore, ...), nft (iptables-nft-restore,
    /// ...) or legacy (iptables-legacy-restore, ...).
    #[arg(long, env = "MUON_INIT_IPTABLES", default_value = "auto")]
    pub iptables: String,

    /// Print the payload(s) that would be fed to iptables-restore/ip6tables-restore and change
    /// nothing. Needs neither root nor iptables.
    #[arg(long, env = "MUON_INIT_DRY_RUN", value_parser = clap::builder::BoolishValueParser::new())]
    pub dry_run: bool,

    /// Remove Muon's jumps from PREROUTING/OUTPUT and flush and delete the MUON_* chains.
    #[arg(long, env = "MUON_INIT_CLEANUP", value_parser = clap::builder::BoolishValueParser::new())]
    pub cleanup: bool,

    /// Touch no rules: wait until `GET /ready` at this address (the proxy's health port, e.g.
    /// 127.0.0.1:15020) answers 200, then exit 0 (a classic sidecar's postStart hook, which
    /// holds the app until the proxy is ready). Needs neither root nor iptables.
    #[arg(long, env = "MUON_INIT_WAIT_READY")]
    pub wait_ready: Option<String>,

    /// With --wait-ready: give up (exit 1) after this long.
    #[arg(long, env = "MUON_INIT_WAIT_TIMEOUT", default_value = "2m")]
    pub wait_timeout: String,
}

/// `--wait-ready`: what to wait for, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReady {
    pub addr: std::net::SocketAddr,
    pub timeout: std::time::Duration,
}

/// Which destinations or ports a direction captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture<T> {
    /// Everything (`*`).
    All,
    /// Only these; an empty list turns capture in that direction off.
    Only(Vec<T>),
}

/// `--ipv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    On,
    Off,
    /// On when `/proc/net/if_inet6` exists and ip6tables-restore is installed.
    Auto,
}

/// `--iptables`: which family of binaries programs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The plain names (`iptables-restore`), whatever the distribution points them at.
    Auto,
    /// `iptables-nft-restore` and friends.
    Nft,
    /// `iptables-legacy-restore` and friends.
    Legacy,
}

impl Backend {
    /// The binary name for `tool` (`"restore"` or `"save"`) and the given family.
    pub fn binary(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Backend::Auto => format!("{base}-{tool}"),
            Backend::Nft => format!("{base}-nft-{tool}"),
            Backend::Legacy => format!("{base}-legacy-{tool}"),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

impl Ipv6Mode {
    fn as_str(self) -> &'static str {
        match self {
            Ipv6Mode::On => "on",
            Ipv6Mode::Off => "off",
            Ipv6Mode::Auto => "auto",
        }
    }
}

/// An IP address family: iptables and ip6tables are programmed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

pub use muon_core::net::Cidr;

/// The family of a prefix, for the per-family rulesets.
pub fn family_of(c: &Cidr) -> Family {
    match c.is_ipv4() {
        true => Family::V4,
        false => Family::V6,
    }
}

/// The validated configuration. Build it with [`Config::from_args`] or start from
/// [`Config::default`], which matches the flag defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub health_port: u16,
    pub admin_port: u16,
    pub include_inbound_ports: Capture<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_outbound_cidrs: Capture<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub ipv6: Ipv6Mode,
    pub iptables: Backend,
    pub dry_run: bool,
    pub cleanup: bool,
    /// Set: wait for the proxy instead of programming rules.
    pub wait_ready: Option<WaitReady>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy_uid: ports::PROXY_UID,
            proxy_gid: ports::PROXY_UID,
            outbound_port: ports::OUTBOUND,
            inbound_port: ports::INBOUND,
            health_port: ports::HEALTH,
            admin_port: ports::ADMIN,
            include_inbound_ports: Capture::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Capture::All,
            exclude_outbound_cidrs: Vec::new(),
            ipv6: Ipv6Mode::Auto,
            iptables: Backend::Auto,
            dry_run: false,
            cleanup: false,
            wait_ready: None,
        }
    }
}

/// Every problem found in the flags, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid muon-init configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Validates `args`, collecting every problem before returning.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let mut p = Vec::new();
        let proxy_uid = parse_id("--proxy-uid", &args.proxy_uid, &mut p);
        let proxy_gid = match &args.proxy_gid {
            // An empty value (e.g. an env var set to "") means the default, like no value.
            Some(gid) if !gid.trim().is_empty() => parse_id("--proxy-gid", gid, &mut p),
            _ => proxy_uid,
        };
        let outbound_port = parse_port("--outbound-port", &args.outbound_port, &mut p);
        let inbound_port = parse_port("--inbound-port", &args.inbound_port, &mut p);
        let health_port = parse_port("--health-port", &args.health_port, &mut p);
        let admin_port = parse_port("--admin-port", &args.admin_port, &mut p);
        if outbound_port == inbound_port && outbound_port != 0 {
            p.push(format!(
                "--outbound-port and --inbound-port are both {outbound_port}; they must differ"
            ));
        }
        let include_inbound_ports = parse_capture(
            "--include-inbound-ports",
            &args.include_inbound_ports,
            &mut p,
            parse_port_item,
        );
        let exclude_inbound_ports = parse_list(
            "--exclude-inbound-ports",
            &args.exclude_inbound_ports,
            &mut p,
            parse_port_item,
        );
        let exclude_outbound_ports = parse_list(
            "--exclude-outbound-ports",
            &args.exclude_outbound_ports,
            &mut p,
            parse_port_item,
        );
        let include_outbound_cidrs = parse_capture(
            "--include-outbound-cidrs",
            &args.include_outbound_cidrs,
            &mut p,
            Cidr::parse,
        );
        let exclude_outbound_cidrs = parse_list(
            "--exclude-outbound-cidrs",
            &args.exclude_outbound_cidrs,
            &mut p,
            Cidr::parse,
        );
        let ipv6 = match args.ipv6.as_str() {
            "on" => Ipv6Mode::On,
            "off" => Ipv6Mode::Off,
            "auto" => Ipv6Mode::Auto,
            other => {
                p.push(format!(
                    "--ipv6: unknown mode {other:?} (expected on, off or auto)"
                ));
                Ipv6Mode::Auto
            }
        };
        let iptables = match args.iptables.as_str() {
            "auto" => Backend::Auto,
            "nft" => Backend::Nft,
            "legacy" => Backend::Legacy,
            other => {
                p.push(format!(
                    "--iptables: unknown mode {other:?} (expected auto, nft or legacy)"
                ));
                Backend::Auto
            }
        };
        let wait_timeout = match muon_core::duration::parse_flag_positive(&args.wait_timeout) {
            Ok(d) => d,
            Err(e) => {
                p.push(format!("--wait-timeout: {e}"));
                std::time::Duration::ZERO
            }
        };
        let wait_ready = match args.wait_ready.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => match addr.parse() {
                Ok(addr) => Some(WaitReady {
                    addr,
                    timeout: wait_timeout,
                }),
                Err(_) => {
                    p.push(format!(
                        "--wait-ready: {addr:?} is not an address like 127.0.0.1:15020"
                    ));
                    None
                }
            },
        };
        if wait_ready.is_some() && (args.cleanup || args.dry_run) {
            p.push("--wait-ready cannot be combined with --cleanup or --dry-run".into());
        }
        if !p.is_empty() {
            return Err(ConfigError { problems: p });
        }
        Ok(Config {
            proxy_uid,
            proxy_gid,
            outbound_port,
            inbound_port,
            health_port,
            admin_port,
            include_inbound_ports,
            exclude_inbound_ports,
            exclude_outbound_ports,
            include_outbound_cidrs,
            exclude_outbound_cidrs,
            ipv6,
            iptables,
            dry_run: args.dry_run,
            cleanup: args.cleanup,
            wait_ready,
        })
    }

    /// The command-line arguments (without the program name) that reproduce this config, for
    /// callers such as the lab that run the `muon-init` binary inside a pod's namespace.
    pub fn to_cli_args(&self) -> Vec<String> {
        fn join<T: ToString>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
        fn capture<T: ToString>(c: &Capture<T>) -> String {
            match c {
                Capture::All => "*".to_string(),
                Capture::Only(items) => join(items),
            }
        }
        let mut a = vec![
            format!("--proxy-uid={}", self.proxy_uid),
            format!("--proxy-gid={}", self.proxy_gid),
            format!("--outbound-port={}", self.outbound_port),
            format!("--inbound-port={}", self.inbound_port),
            format!("--health-port={}", self.health_port),
            format!("--admin-port={}", self.admin_port),
            format!(
                "--include-inbound-ports={}",
                capture(&self.include_inbound_ports)
            ),
            format!(
                "--exclude-inbound-ports={}",
                join(&self.exclude_inbound_ports)
            ),
            format!(
                "--exclude-outbound-ports={}",
                join(&self.exclude_outbound_ports)
            ),
            format!(
                "--include-outbound-cidrs={}",
                capture(&self.include_outbound_cidrs)
            ),
            format!(
                "--exclude-outbound-cidrs={}",
                join(&self.exclude_outbound_cidrs)
            ),
            format!("--ipv6={}", self.ipv6.as_str()),
            format!("--iptables={}", self.iptables.as_str()),
        ];
        if self.dry_run {
            a.push("--dry-run".to_string());
        }
        if self.cleanup {
            a.push("--cleanup".to_string());
        }
        if let Some(w) = &self.wait_ready {
            a.push(format!("--wait-ready={}", w.addr));
            a.push(format!(
                "--wait-timeout={}",
                muon_core::duration::format(w.timeout)
            ));
        }
        a
    }
}

fn parse_id(flag: &str, value: &str, problems: &mut Vec<String>) -> u32 {
    match value.trim().parse::<u32>() {
        Ok(id) => id,
        Err(_) => {
            problems.push(format!("{flag}: {value:?} is not a numeric id"));
            0
        }
    }
}

fn parse_port(flag: &str, value: &str, problems: &mut Vec<String>) -> u16 {
    match parse_port_item(value.trim()) {
        Ok(port) => port,
        Err(e) => {
            problems.push(format!("{flag}: {e}"));
            0
        }
    }
}

fn parse_port_item(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(0) => Err(format!("port {s:?} is out of range (1..=65535)")),
        Ok(n) => u16::try_from(n).map_err(|_| format!("port {s:?} is out of range (1..=65535)")),
        Err(_) => Err(format!("{s:?} is not a port number")),
    }
}

/// A comma list; blank items are ignored so `""` is the empty list and `"80,"` is `[80]`.
/// Duplicates are dropped, keeping the first, so each generates one rule.
fn parse_list<T: PartialEq>(
    flag: &str,
    value: &str,
    problems: &mut Vec<String>,
    item: impl Fn(&str) -> Result<T, String>,
) -> Vec<T> {
    let mut out = Vec::new();
    for raw in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if raw == "*" {
            problems.push(format!("{flag}: `*` is not allowed here"));
            continue;
        }
        match item(raw) {
            Ok(v) if !out.contains(&v) => out.push(v),
            Ok(_) => {}
            Err(e) => problems.push(format!("{flag}: {e}")),
        }
    }
    out
}

fn parse_capture<T: PartialEq>(
    flag: &str,
    value: &str,
    problems: &mut Vec<String>,
    item: impl Fn(&str) -> Result<T, String>,
) -> Capture<T> {
    if value.trim() == "*" {
        return Capture::All;
    }
    if value.split(',').any(|s| s.trim() == "*") {
        problems.push(format!(
            "{flag}: `*` must be the whole value, not part of a list"
        ));
        return Capture::All;
    }
    Capture::Only(parse_list(flag, value, problems, item))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["muon-init"];
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        Config::from_args(&args)
    }

    #[test]
    fn no_flags_give_the_default_config() {
        assert_eq!(parse(&[]), Ok(Config::default()));
    }

    #[test]
    fn gid_defaults_to_uid() {
        let c = parse(&["--proxy-uid", "1000"]).unwrap();
        assert_eq!((c.proxy_uid, c.proxy_gid), (1000, 1000));
        let c = parse(&["--proxy-uid", "1000", "--proxy-gid", "2000"]).unwrap();
        assert_eq!((c.proxy_uid, c.proxy_gid), (1000, 2000));
        let c = parse(&["--proxy-uid", "1000", "--proxy-gid", ""]).unwrap();
        assert_eq!((c.proxy_uid, c.proxy_gid), (1000, 1000));
    }

    #[test]
    fn lists_are_trimmed_deduplicated_and_empty_means_none() {
        let c = parse(&[
            "--include-inbound-ports",
            " 8080, 9090,8080,",
            "--exclude-outbound-cidrs",
            "10.1.2.3/8, fd00::1/8,192.168.1.1",
            "--include-outbound-cidrs",
            "",
        ])
        .unwrap();
        assert_eq!(c.include_inbound_ports, Capture::Only(vec![8080, 9090]));
        let cidrs: Vec<String> = c
            .exclude_outbound_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]);
        assert_eq!(c.include_outbound_cidrs, Capture::Only(vec![]));
    }

    #[test]
    fn every_bad_value_is_reported_together() {
        let err = parse(&[
            "--proxy-uid",
            "proxy",
            "--outbound-port",
            "0",
            "--inbound-port",
            "70000",
            "--health-port",
            "x",
            "--include-inbound-ports",
            "80,*",
            "--exclude-inbound-ports",
            "22,abc",
            "--exclude-outbound-ports",
            "65536",
            "--include-outbound-cidrs",
            "10.0.0.0/33,not-a-cidr",
            "--exclude-outbound-cidrs",
            "fd00::/129",
            "--ipv6",
            "maybe",
            "--iptables",
            "ebpf",
        ])
        .unwrap_err();
        let expected = [
            "--proxy-uid: \"proxy\" is not a numeric id",
            "--outbound-port: port \"0\" is out of range",
            "--inbound-port: port \"70000\" is out of range",
            "--health-port: \"x\" is not a port number",
            "--include-inbound-ports: `*` must be the whole value",
            "--exclude-inbound-ports: \"abc\" is not a port number",
            "--exclude-outbound-ports: port \"65536\" is out of range",
            "--include-outbound-cidrs: \"10.0.0.0/33\" has an invalid prefix length",
            "--include-outbound-cidrs: \"not-a-cidr\" is not a CIDR",
            "--exclude-outbound-cidrs: \"fd00::/129\" has an invalid prefix length",
            "--ipv6: unknown mode \"maybe\"",
            "--iptables: unknown mode \"ebpf\"",
        ];
        assert_eq!(err.problems.len(), expected.len(), "{err}");
        for (problem, want) in err.problems.iter().zip(expected) {
            assert!(
                problem.starts_with(want),
                "{problem:?} should start with {want:?}"
            );
        }
        // The message a user sees lists all of them.
        let shown = err.to_string();
        assert!(shown.starts_with("invalid muon-init configuration:"));
        assert_eq!(shown.matches("\n  - ").count(), expected.len());
    }

    #[test]
    fn same_outbound_and_inbound_port_is_rejected() {
        let err = parse(&["--outbound-port", "15006"]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].contains("must differ"));
    }

    #[test]
    fn star_inside_an_exclude_list_is_rejected() {
        let err = parse(&["--exclude-outbound-cidrs", "*"]).unwrap_err();
        assert!(err.problems[0].contains("not allowed"));
    }

    #[test]
    fn cli_args_round_trip() {
        let config = Config {
            proxy_uid: 7,
            proxy_gid: 8,
            include_inbound_ports: Capture::Only(vec![80, 443]),
            exclude_outbound_ports: vec![3306],
            include_outbound_cidrs: Capture::Only(vec![
                Cidr::parse("10.0.0.0/8").unwrap(),
                Cidr::parse("2001:db8::/32").unwrap(),
            ]),
            ipv6: Ipv6Mode::Off,
            iptables: Backend::Legacy,
            cleanup: true,
            ..Config::default()
        };
        let argv = config.to_cli_args();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert_eq!(parse(&argv), Ok(config));
        let none = Config {
            include_inbound_ports: Capture::Only(vec![]),
            ..Config::default()
        };
        let argv = none.to_cli_args();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert_eq!(parse(&argv), Ok(none));
    }

    #[test]
    fn wait_ready_is_checked_and_round_trips() {
        let c = parse(&["--wait-ready", "127.0.0.1:15020", "--wait-timeout", "30s"]).unwrap();
        let w = c.wait_ready.unwrap();
        assert_eq!(w.addr, "127.0.0.1:15020".parse().unwrap());
        assert_eq!(w.timeout, std::time::Duration::from_secs(30));
        let argv = c.to_cli_args();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert_eq!(parse(&argv), Ok(c));
        let err = parse(&["--wait-ready", "localhost", "--wait-timeout", "0s"]).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].starts_with("--wait-timeout"), "{err}");
        assert!(
            err.problems[1].starts_with("--wait-ready: \"localhost\""),
            "{err}"
        );
        let err = parse(&["--wait-ready", "127.0.0.1:15020", "--cleanup"]).unwrap_err();
        assert!(err.problems[0].contains("cannot be combined"), "{err}");
    }

    #[test]
    fn backend_binary_names() {
        assert_eq!(
            Backend::Auto.binary(Family::V4, "restore"),
            "iptables-restore"
        );
        assert_eq!(
            Backend::Nft.binary(Family::V6, "save"),
            "ip6tables-nft-save"
        );
        assert_eq!(
            Backend::Legacy.binary(Family::V4, "restore"),
            "iptables-legacy-restore"
        );
    }
}
