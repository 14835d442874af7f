//! A pod's `muon.io/*` annotations, checked and turned into what the injected containers
//! carry: muon-init flags, the sidecar's resources and log level, the sidecar mode.
//!
//! The capture annotations are checked by muon-init's own flag parser, so a value injection
//! accepts is one muon-init accepts at start.

use crate::template::*;
use serde_json::{Map, Value};

/// The sidecar's resources unless annotations say otherwise.
pub const DEFAULT_PROXY_CPU: &str = "50m";
pub const DEFAULT_PROXY_MEMORY: &str = "64Mi";
/// The memory limit when `muon.io/proxy-memory` is not set (with it, request = limit).
pub const DEFAULT_PROXY_MEMORY_LIMIT: &str = "512Mi";
pub const DEFAULT_PROXY_LOG_LEVEL: &str = "info";

/// What the annotations of one pod ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: SidecarMode,
    /// muon-init flags, in a fixed order (`--flag=value`).
    pub init_args: Vec<String>,
    /// `muon.io/opaque-ports`, checked (the control plane reads the annotation itself).
    pub opaque_ports: Vec<u16>,
    pub cpu: String,
    /// `muon.io/proxy-memory`, when set (request and limit).
    pub memory: Option<String>,
    pub log_level: String,
}

/// A string annotation, or `None`. A non-string value is a problem.
fn get<'a>(
    annotations: &'a Map<String, Value>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<&'a str> {
    match annotations.get(key)? {
        Value::String(s) => Some(s.as_str()),
        other => {
            problems.push(format!(
                "annotation {key}: {other} is not a string (quote it)"
            ));
            None
        }
    }
}

/// Reads and checks every annotation; every problem is reported.
pub fn settings(
    annotations: &Map<String, Value>,
    template: &Template,
) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let mode = match get(annotations, ANNOTATION_SIDECAR_MODE, &mut problems) {
        None => template.mode,
        Some(s) => SidecarMode::parse(s).unwrap_or_else(|e| {
            problems.push(format!("annotation {ANNOTATION_SIDECAR_MODE}: {e}"));
            template.mode
        }),
    };
    let mut init_args = Vec::new();
    for (key, flag) in [
        (ANNOTATION_EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports"),
        (
            ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
            "--exclude-outbound-ports",
        ),
        (
            ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
            "--exclude-outbound-cidrs",
        ),
    ] {
        let Some(value) = get(annotations, key, &mut problems) else {
            continue;
        };
        match init_flag(flag, value) {
            Ok(Some(arg)) => init_args.push(arg),
            Ok(None) => {}
            Err(e) => problems.extend(e.into_iter().map(|e| format!("annotation {key}: {e}"))),
        }
    }
    let opaque_ports = match get(annotations, ANNOTATION_OPAQUE_PORTS, &mut problems) {
        None => Vec::new(),
        Some(v) => port_list(v).unwrap_or_else(|e| {
            problems.push(format!("annotation {ANNOTATION_OPAQUE_PORTS}: {e}"));
            Vec::new()
        }),
    };
    let mut quantity = |key: &str| -> Option<String> {
        let v = get(annotations, key, &mut problems)?.trim().to_string();
        match check_quantity(&v) {
            Ok(()) => Some(v),
            Err(e) => {
                problems.push(format!("annotation {key}: {e}"));
                None
            }
        }
    };
    let cpu = quantity(ANNOTATION_PROXY_CPU).unwrap_or_else(|| DEFAULT_PROXY_CPU.into());
    let memory = quantity(ANNOTATION_PROXY_MEMORY);
    let log_level = match get(annotations, ANNOTATION_PROXY_LOG_LEVEL, &mut problems) {
        None => DEFAULT_PROXY_LOG_LEVEL.to_string(),
        Some(v) => match check_log_level(v.trim()) {
            Ok(()) => v.trim().to_string(),
            Err(e) => {
                problems.push(format!("annotation {ANNOTATION_PROXY_LOG_LEVEL}: {e}"));
                DEFAULT_PROXY_LOG_LEVEL.to_string()
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        mode,
        init_args,
        opaque_ports,
        cpu,
        memory,
        log_level,
    })
}

/// `--flag=value` checked by muon-init's parser, normalised to what it parsed (so
/// `10.1.2.3/8, 80` style input becomes its canonical list); `None` for an empty list.
fn init_flag(flag: &str, value: &str) -> Result<Option<String>, Vec<String>> {
    use muon_init::config::{Args, Config};
    let arg = format!("{flag}={value}");
    let args = <Args as clap::Parser>::try_parse_from(["muon-init", arg.as_str()])
        .map_err(|e| vec![e.to_string()])?;
    let config = Config::from_args(&args).map_err(|e| {
        e.problems
            .into_iter()
            .map(|p| {
                p.strip_prefix(&format!("{flag}: "))
                    .unwrap_or(&p)
                    .to_string()
            })
            .collect::<Vec<_>>()
    })?;
    fn join<T: ToString>(v: &[T]) -> String {
        v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }
    let list = match flag {
        "--exclude-inbound-ports" => join(&config.exclude_inbound_ports),
        "--exclude-outbound-ports" => join(&config.exclude_outbound_ports),
        _ => join(&config.exclude_outbound_cidrs),
    };
    Ok((!list.is_empty()).then(|| format!("{flag}={list}")))
}

/// A comma list of ports (blanks ignored, duplicates dropped).
fn port_list(v: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p > 0 => {
                if !out.contains(&p) {
                    out.push(p)
                }
            }
            _ => return Err(format!("{item:?} is not a port number (1-65535)")),
        }
    }
    Ok(out)
}

/// A Kubernetes resource quantity (`100m`, `0.5`, `128Mi`, `1e3`), not negative.
pub fn check_quantity(q: &str) -> Result<(), String> {
    let bad = || format!("{q:?} is not a resource quantity like 100m or 128Mi");
    let digits_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits_end);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let frac = parts.next();
    if (whole.is_empty() && frac.is_none_or(str::is_empty)) || frac.is_some_and(|f| f.contains('.'))
    {
        return Err(bad());
    }
    let suffix_ok = match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        s if s.starts_with(['e', 'E']) => {
            let exp = s[1..].strip_prefix(['+', '-']).unwrap_or(&s[1..]);
            !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
        }
        _ => false,
    };
    match suffix_ok {
        true => Ok(()),
        false => Err(bad()),
    }
}

/// A log level or tracing directives: the characters EnvFilter directives are made of (the
/// proxy checks the directives themselves at start).
fn check_log_level(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{v:?} is not a log level or filter like info or info,access=off"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn no_annotations_give_the_defaults() {
        let s = settings(&Map::new(), &Template::default()).unwrap();
        assert_eq!(s.mode, SidecarMode::Native);
        assert!(s.init_args.is_empty());
        assert_eq!((s.cpu.as_str(), s.memory), (DEFAULT_PROXY_CPU, None));
        assert_eq!(s.log_level, "info");
    }

    #[test]
    fn annotations_become_canonical_muon_init_flags() {
        let s = settings(
            &of(json!({
                "muon.io/exclude-inbound-ports": " 9090, 8080,9090",
                "muon.io/exclude-outbound-ports": "5432",
                "muon.io/exclude-outbound-cidrs": "10.1.2.3/8, fd00::1/8",
                "muon.io/opaque-ports": "3306,6379",
                "muon.io/proxy-cpu": "250m",
                "muon.io/proxy-memory": "128Mi",
                "muon.io/proxy-log-level": "debug,access=off",
                "muon.io/sidecar-mode": "classic",
            })),
            &Template::default(),
        )
        .unwrap();
        assert_eq!(
            s.init_args,
            [
                "--exclude-inbound-ports=9090,8080",
                "--exclude-outbound-ports=5432",
                "--exclude-outbound-cidrs=10.0.0.0/8,fd00::/8",
            ]
        );
        assert_eq!(s.opaque_ports, [3306, 6379]);
        assert_eq!(
            (s.cpu.as_str(), s.memory.as_deref()),
            ("250m", Some("128Mi"))
        );
        assert_eq!(s.log_level, "debug,access=off");
        assert_eq!(s.mode, SidecarMode::Classic);
    }

    #[test]
    fn every_bad_annotation_is_reported_by_name() {
        let err = settings(
            &of(json!({
                "muon.io/exclude-inbound-ports": "80,abc",
                "muon.io/exclude-outbound-ports": 5432,
                "muon.io/exclude-outbound-cidrs": "10.0.0.0/33",
                "muon.io/opaque-ports": "0",
                "muon.io/proxy-cpu": "lots",
                "muon.io/proxy-memory": "-1Gi",
                "muon.io/proxy-log-level": "debug; rm -rf",
                "muon.io/sidecar-mode": "sometimes",
            })),
            &Template::default(),
        )
        .unwrap_err();
        let want = [
            "annotation muon.io/sidecar-mode: \"sometimes\" is not native or classic",
            "annotation muon.io/exclude-inbound-ports: \"abc\" is not a port number",
            "annotation muon.io/exclude-outbound-ports: 5432 is not a string (quote it)",
            "annotation muon.io/exclude-outbound-cidrs: \"10.0.0.0/33\" has an invalid prefix length",
            "annotation muon.io/opaque-ports: \"0\" is not a port number",
            "annotation muon.io/proxy-cpu: \"lots\" is not a resource quantity",
            "annotation muon.io/proxy-memory: \"-1Gi\" is not a resource quantity",
            "annotation muon.io/proxy-log-level: \"debug; rm -rf\" is not a log level",
        ];
        assert_eq!(err.len(), want.len(), "{err:#?}");
        for (got, want) in err.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn quantities() {
        for ok in [
            "100m", "0.5", "1", "128Mi", "1Gi", "2k", "1e3", "1.5E-2", ".5",
        ] {
            assert_eq!(check_quantity(ok), Ok(()), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "12mb", "1e", "-1", "1 Gi", "1ki"] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
    }
}
