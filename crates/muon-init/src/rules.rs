//! The capture rules themselves: what the nat table should contain for a [`Config`].
//!
//! Pure functions of the configuration, no I/O. The layout must match what the proxy expects
//! (see `docs/config-muon-init.md`): PREROUTING sends TCP to `MUON_INBOUND`, which redirects
//! to the inbound port; OUTPUT sends TCP to `MUON_OUTPUT`, which lets the proxy's own traffic
//! and local traffic through and redirects the rest to the outbound port. Rules are written
//! the way `iptables-save` prints them, so a payload reads like the table it produces.

use muon_core::ports;

use crate::config::{Capture, Config, Family};

/// Chain the PREROUTING jump goes to; decides which inbound ports are captured.
pub const INBOUND: &str = "MUON_INBOUND";
/// Redirects to the inbound listener.
pub const IN_REDIRECT: &str = "MUON_IN_REDIRECT";
/// Chain the OUTPUT jump goes to; decides which outbound connections are captured.
pub const OUTPUT: &str = "MUON_OUTPUT";
/// Redirects to the outbound listener.
pub const REDIRECT: &str = "MUON_REDIRECT";
/// Every chain muon-init owns starts with this; `--cleanup` removes all of them.
pub const CHAIN_PREFIX: &str = "MUON_";

/// A user-defined chain and its rules, each rule being what follows `-A <name> `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

/// A rule in a built-in chain (PREROUTING or OUTPUT) that jumps into a Muon chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    /// The built-in chain holding the rule.
    pub from: String,
    /// The rule spec, e.g. `-p tcp -j MUON_OUTPUT`.
    pub spec: String,
}

/// Muon's part of one family's nat table: its chains and the jumps into them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: Vec<Chain>,
    pub jumps: Vec<Jump>,
}

/// The rules `config` asks for in `family`'s nat table. Capture is off in a direction when its
/// include list is empty (for outbound: has no CIDR of this family); then neither the jump nor
/// the chains only that direction uses are created.
pub fn ruleset(config: &Config, family: Family) -> Ruleset {
    let inbound = !matches!(&config.include_inbound_ports, Capture::Only(p) if p.is_empty());
    let outbound_cidrs: Capture<String> = match &config.include_outbound_cidrs {
        Capture::All => Capture::All,
        Capture::Only(cidrs) => Capture::Only(
            cidrs
                .iter()
                .filter(|c| crate::config::family_of(c) == family)
                .map(ToString::to_string)
                .collect(),
        ),
    };
    let outbound = !matches!(&outbound_cidrs, Capture::Only(c) if c.is_empty());

    let mut rs = Ruleset::default();
    if inbound {
        rs.chains.push(inbound_chain(config));
    }
    // MUON_OUTPUT also sends the proxy's calls to its own pod to inbound, so the redirect
    // chain is needed whenever either direction is on.
    if inbound || outbound {
        rs.chains.push(Chain {
            name: IN_REDIRECT.to_string(),
            rules: vec![format!(
                "-p tcp -j REDIRECT --to-ports {}",
                config.inbound_port
            )],
        });
    }
    if outbound {
        rs.chains
            .push(output_chain(config, family, &outbound_cidrs));
        rs.chains.push(Chain {
            name: REDIRECT.to_string(),
            rules: vec![format!(
                "-p tcp -j REDIRECT --to-ports {}",
                config.outbound_port
            )],
        });
    }
    if inbound {
        rs.jumps.push(Jump {
            from: "PREROUTING".to_string(),
            spec: format!("-p tcp -j {INBOUND}"),
        });
    }
    if outbound {
        rs.jumps.push(Jump {
            from: "OUTPUT".to_string(),
            spec: format!("-p tcp -j {OUTPUT}"),
        });
    }
    rs
}

fn inbound_chain(config: &Config) -> Chain {
    let mut rules = Vec::new();
    // The proxy's own listeners are reached directly, never through itself.
    let mut returned: Vec<u16> = Vec::new();
    for port in [
        config.admin_port,
        config.outbound_port,
        config.inbound_port,
        config.health_port,
    ]
    .into_iter()
    .chain(config.exclude_inbound_ports.iter().copied())
    {
        if !returned.contains(&port) {
            returned.push(port);
            rules.push(format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
    }
    match &config.include_inbound_ports {
        Capture::All => rules.push(format!("-p tcp -j {IN_REDIRECT}")),
        Capture::Only(ports) => {
            for port in ports {
                rules.push(format!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"));
            }
        }
    }
    Chain {
        name: INBOUND.to_string(),
        rules,
    }
}

fn output_chain(config: &Config, family: Family, include: &Capture<String>) -> Chain {
    let (inbound_source, loopback) = match family {
        Family::V4 => (format!("{}/32", ports::INBOUND_SOURCE_V4), "127.0.0.1/32"),
        Family::V6 => (format!("{}/128", ports::INBOUND_SOURCE_V6), "::1/128"),
    };
    let mut rules = vec![
        // The inbound proxy connects to the app from this address: already handled.
        format!("-s {inbound_source} -o lo -j RETURN"),
    ];
    for owner in [
        format!("--uid-owner {}", config.proxy_uid),
        format!("--gid-owner {}", config.proxy_gid),
    ] {
        // The app called its own service: the outbound proxy's connection to this pod's IP
        // leaves through lo and must go through inbound (policy, mTLS identity) like any call.
        rules.push(format!(
            "! -d {loopback} -o lo -p tcp -m owner {owner} -j {IN_REDIRECT}"
        ));
        // The app talking to localhost or its own pod IP stays inside the pod, uncaptured.
        let negated = owner.replacen("--", "! --", 1);
        rules.push(format!("-o lo -m owner {negated} -j RETURN"));
        // Everything else the proxy opens is already proxied: never capture it again.
        rules.push(format!("-m owner {owner} -j RETURN"));
    }
    rules.push(format!("-d {loopback} -j RETURN"));
    for port in &config.exclude_outbound_ports {
        rules.push(format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| crate::config::family_of(c) == family)
    {
        rules.push(format!("-d {cidr} -j RETURN"));
    }
    match include {
        Capture::All => rules.push(format!("-j {REDIRECT}")),
        Capture::Only(cidrs) => {
            for cidr in cidrs {
                rules.push(format!("-d {cidr} -j {REDIRECT}"));
            }
        }
    }
    Chain {
        name: OUTPUT.to_string(),
        rules,
    }
}
