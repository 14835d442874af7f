//! Everything that touches the system: finding the iptables binaries, reading the current nat
//! tables, and feeding the payloads to `iptables-restore`/`ip6tables-restore`.
//!
//! Work is split into [`plan`], which only reads (and is all that `--dry-run` does), and
//! [`Plan::execute`], which writes. All checks (root, binaries, readable nat table) happen in
//! `plan`, so a failure there leaves the namespace untouched.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{Config, Family, Ipv6Mode};
use crate::payload::restore_payload;
use crate::rules::{self, Ruleset};
use crate::state::NatState;

/// Flags for every restore: keep other rules (`--noflush`), and wait a bounded time for the
/// xtables lock, which is one file shared by every network namespace on the host.
pub const RESTORE_ARGS: [&str; 2] = ["--noflush", "--wait=10"];

/// Arguments to `ip` that give `lo` the IPv6 inbound source address (`::6/128`), which the
/// inbound proxy binds before connecting to the app. `replace` makes it idempotent and
/// `nodad` makes it usable at once, without duplicate address detection.
pub fn inbound_source_v6_args() -> Vec<String> {
    let addr = format!("{}/128", muon_core::ports::INBOUND_SOURCE_V6);
    ["-6", "addr", "replace", &addr, "dev", "lo", "nodad"]
        .map(String::from)
        .to_vec()
}

/// Why muon-init could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "muon-init must run as root (it programs iptables), but its effective uid is {euid}; \
         use --dry-run to print the rules without root"
    )]
    NotRoot { euid: u32 },
    #[error(
        "missing {}: not found in PATH or the sbin directories; the package `iptables` provides \
         them (or choose other binaries with --iptables, or disable IPv6 with --ipv6 off)",
        .names.join(", ")
    )]
    MissingBinaries { names: Vec<String> },
    #[error(
        "missing `ip`, needed to add ::6/128 to lo for IPv6; the package `iproute2` provides it"
    )]
    MissingIp,
    #[error("the {family} nat table is unavailable: `{command}` failed: {stderr}")]
    NatUnavailable {
        family: Family,
        command: String,
        stderr: String,
    },
    #[error("`{command}` failed for {family}: {stderr}\npayload was:\n{payload}")]
    Restore {
        family: Family,
        command: String,
        stderr: String,
        payload: String,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("IPv4 was rolled back to its rules before this run because IPv6 failed")]
    RolledBack(#[source] Box<ApplyError>),
    #[error(
        "IPv6 failed ({failure}) and rolling IPv4 back failed too ({rollback}); \
         run `muon-init --cleanup`"
    )]
    RollbackFailed {
        failure: Box<ApplyError>,
        rollback: Box<ApplyError>,
    },
}

/// One family's part of a [`Plan`].
#[derive(Debug, Clone)]
pub struct FamilyPlan {
    pub family: Family,
    /// Name of the restore binary, e.g. `iptables-legacy-restore`.
    pub restore: String,
    /// Where it was found; `None` only in a dry run.
    restore_path: Option<PathBuf>,
    /// Muon's rules before this run.
    pub existing: NatState,
    /// Muon's rules after this run.
    pub desired: Ruleset,
    /// What is fed to `restore` on stdin.
    pub payload: String,
}

/// What a run will do, computed without changing anything.
#[derive(Debug, Clone)]
pub struct Plan {
    /// IPv4 first, then IPv6 if enabled.
    pub families: Vec<FamilyPlan>,
    /// Whether `ip -6 addr replace ::6/128 dev lo nodad` runs first.
    pub add_inbound_source_v6: bool,
    ip_path: Option<PathBuf>,
    /// Things a dry run had to assume (e.g. an unreadable table), for the user to see.
    pub notes: Vec<String>,
}

/// Checks everything and computes the payloads, changing nothing. Without `--dry-run` this
/// fails when not root, when a needed binary is missing or when a nat table can't be read.
/// With it, missing binaries and unreadable tables are noted and treated as empty.
pub fn plan(config: &Config) -> Result<Plan, ApplyError> {
    let dry_run = config.dry_run;
    if !dry_run {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Err(ApplyError::NotRoot {
                euid: euid.as_raw(),
            });
        }
    }

    let backend = config.iptables;
    let ipv6 = match config.ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => {
            kernel_has_ipv6() && find_binary(&backend.binary(Family::V6, "restore")).is_some()
        }
    };
    let families: &[Family] = if ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };

    // Resolve every binary first so one error names all that are missing.
    let mut missing = Vec::new();
    let mut tools = Vec::new();
    for &family in families {
        let restore = backend.binary(family, "restore");
        let save = backend.binary(family, "save");
        let restore_path = find_binary(&restore);
        let save_path = find_binary(&save);
        for (name, path) in [(&restore, &restore_path), (&save, &save_path)] {
            if path.is_none() {
                missing.push(name.clone());
            }
        }
        tools.push((family, restore, restore_path, save, save_path));
    }
    let mut notes = Vec::new();
    if !missing.is_empty() {
        if !dry_run {
            return Err(ApplyError::MissingBinaries { names: missing });
        }
        notes.push(format!("not installed: {}", missing.join(", ")));
    }

    let add_inbound_source_v6 = ipv6 && !config.cleanup;
    let ip_path = find_binary("ip");
    if add_inbound_source_v6 && ip_path.is_none() && !dry_run {
        return Err(ApplyError::MissingIp);
    }

    let mut plans = Vec::new();
    for (family, restore, restore_path, save, save_path) in tools {
        let existing = match read_nat(family, &save, save_path.as_deref()) {
            Ok(state) => state,
            Err(e) if dry_run => {
                notes.push(format!("{e}; assuming no existing {family} rules"));
                NatState::default()
            }
            Err(e) => return Err(e),
        };
        let desired = if config.cleanup {
            Ruleset::default()
        } else {
            rules::ruleset(config, family)
        };
        let payload = restore_payload(&desired, &existing);
        plans.push(FamilyPlan {
            family,
            restore,
            restore_path,
            existing,
            desired,
            payload,
        });
    }
    Ok(Plan {
        families: plans,
        add_inbound_source_v6,
        ip_path,
        notes,
    })
}

impl Plan {
    /// The `--dry-run` output: each payload labelled with the command it would be fed to.
    /// Labels are `#` comments, which iptables-restore ignores.
    pub fn dry_run_text(&self) -> String {
        let mut out = String::from("# muon-init --dry-run: nothing was changed\n");
        if self.add_inbound_source_v6 {
            out.push_str(&format!(
                "# would run: ip {}\n",
                inbound_source_v6_args().join(" ")
            ));
        }
        for fp in &self.families {
            out.push_str(&format!(
                "# {} payload for: {} {}\n",
                fp.family,
                fp.restore,
                RESTORE_ARGS.join(" ")
            ));
            out.push_str(&fp.payload);
        }
        out
    }

    /// Applies the plan. IPv4 goes first; if IPv6 then fails, IPv4 is put back to its state
    /// before this run, so the namespace never keeps a half-applied configuration.
    pub fn execute(&self) -> Result<(), ApplyError> {
        if self.add_inbound_source_v6 {
            let ip = self.ip_path.as_deref().ok_or(ApplyError::MissingIp)?;
            let args = inbound_source_v6_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(ip, &args, None)?;
        }
        let mut applied: Vec<&FamilyPlan> = Vec::new();
        for fp in &self.families {
            match restore(fp, &fp.payload) {
                Ok(()) => applied.push(fp),
                Err(e) if applied.is_empty() => return Err(e),
                Err(e) => return Err(roll_back(&applied, e)),
            }
        }
        Ok(())
    }
}

fn roll_back(applied: &[&FamilyPlan], failure: ApplyError) -> ApplyError {
    for fp in applied {
        // After a successful restore the table holds exactly `desired`, so the way back is
        // computable without reading it again.
        let back = restore_payload(
            &fp.existing.to_ruleset(),
            &NatState::from_ruleset(&fp.desired),
        );
        if let Err(rollback) = restore(fp, &back) {
            return ApplyError::RollbackFailed {
                failure: Box::new(failure),
                rollback: Box::new(rollback),
            };
        }
    }
    ApplyError::RolledBack(Box::new(failure))
}

fn restore(fp: &FamilyPlan, payload: &str) -> Result<(), ApplyError> {
    let path = fp
        .restore_path
        .as_deref()
        .ok_or_else(|| ApplyError::MissingBinaries {
            names: vec![fp.restore.clone()],
        })?;
    run(path, &RESTORE_ARGS, Some(payload))
        .map(drop)
        .map_err(|e| match e {
            ApplyError::Command { command, stderr } => ApplyError::Restore {
                family: fp.family,
                command,
                stderr,
                payload: payload.to_string(),
            },
            other => other,
        })
}

fn read_nat(family: Family, save: &str, path: Option<&Path>) -> Result<NatState, ApplyError> {
    let path = path.ok_or_else(|| ApplyError::MissingBinaries {
        names: vec![save.to_string()],
    })?;
    match run(path, &["-t", "nat"], None) {
        Ok(out) => Ok(NatState::parse(&out)),
        Err(ApplyError::Command { command, stderr }) => Err(ApplyError::NatUnavailable {
            family,
            command,
            stderr,
        }),
        Err(e) => Err(e),
    }
}

/// Runs `program args`, feeding `stdin` if given; returns stdout, or the stderr on failure.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let spawn_err = |source| ApplyError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Payloads are a few KiB, far below the pipe buffer, so writing before reading the
        // child's output cannot deadlock. Dropping the pipe sends EOF.
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(ApplyError::Command {
            command,
            stderr: if stderr.is_empty() {
                format!("exited with {}", out.status)
            } else {
                stderr
            },
        })
    }
}

/// `/proc/net` shows the current network namespace, so this is the namespace's view.
fn kernel_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// Looks in PATH and then the sbin directories, which a non-login PATH often lacks.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
