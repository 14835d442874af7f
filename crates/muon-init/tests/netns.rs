//! The real binary against real iptables, each test inside a network namespace of its own
//! (`muon-init-t<pid>-<n>-<nanos>`, deleted on drop, also when a test panics). Nothing here
//! touches the host namespace: every command runs through `ip netns exec`.
//!
//! These tests need root and fail, rather than pass silently, without it. They also fail
//! without IPv6 in the kernel or without both iptables backends (nft and legacy, which
//! Debian's `iptables` package installs and `cargo xtask test` installs when missing); a
//! developer without one can say so with `MUON_TEST_WITHOUT=ipv6,nft,legacy`, never in CI.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use muon_init::{restore_payload, ruleset, Backend, Config, Family, NatState};

const BIN: &str = env!("CARGO_BIN_EXE_muon-init");

/// A network namespace owned by one test.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the muon-init netns tests must run as root (they create network namespaces and \
             program iptables inside them); run `sudo -E cargo test -p muon-init`"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "muon-init-t{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            nanos % 1_000_000
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            text(&out.stderr)
        );
        Netns { name }
    }

    /// Runs `program args` inside the namespace.
    fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.name))
    }

    /// Like [`Netns::exec`] but the command must succeed; returns its stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed in {}: {}{}",
            self.name,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn init(&self, args: &[&str]) -> Output {
        self.exec(BIN, args)
    }

    fn init_ok(&self, args: &[&str]) -> String {
        self.ok(BIN, args)
    }

    /// `iptables-save -t nat` without comments and counters: what must stay byte-identical.
    fn nat(&self, backend: Backend, family: Family) -> String {
        normalize(&self.ok(&backend.binary(family, "save"), &["-t", "nat"]))
    }

    fn lo_v6_addrs(&self) -> String {
        self.ok("ip", &["-6", "addr", "show", "dev", "lo"])
    }

    fn has_ipv6(&self) -> bool {
        self.exec("test", &["-e", "/proc/net/if_inet6"])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn normalize(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]\n", &l[..i]),
            _ => format!("{l}\n"),
        })
        .collect()
}

fn installed(name: &str) -> bool {
    muon_init::apply::find_binary(name).is_some()
}

/// The iptables CLI of a backend, for setting up and checking test state.
fn cli(backend: Backend, family: Family) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match backend {
        Backend::Auto => base.to_string(),
        Backend::Nft => format!("{base}-nft"),
        Backend::Legacy => format!("{base}-legacy"),
    }
}

fn backend_flag(backend: Backend) -> &'static str {
    match backend {
        Backend::Auto => "--iptables=auto",
        Backend::Nft => "--iptables=nft",
        Backend::Legacy => "--iptables=legacy",
    }
}

fn backend_installed(backend: Backend, family: Family) -> bool {
    ["restore", "save"]
        .iter()
        .all(|t| installed(&backend.binary(family, t)))
        && installed(&cli(backend, family))
}

/// The machine lacks `what` (`ipv6`, `nft`, `legacy`): the test fails, saying what to
/// install, unless `what` is listed in `MUON_TEST_WITHOUT` outside CI, where the caller skips
/// what needs it.
fn skip_without(what: &str, missing: &str) {
    let listed =
        std::env::var("MUON_TEST_WITHOUT").is_ok_and(|v| v.split(',').any(|w| w.trim() == what));
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    assert!(
        listed && !ci,
        "{missing}; this test needs it{}",
        if ci {
            " (CI must have it: MUON_TEST_WITHOUT is ignored when CI is set)".to_string()
        } else {
            format!(" (or set MUON_TEST_WITHOUT={what} to skip what needs it on this machine)")
        }
    );
    eprintln!("{missing}: skipped, as MUON_TEST_WITHOUT={what} asks");
}

/// The binaries of an iptables backend must be there (Debian package `iptables`).
fn require_backend(backend: Backend, family: Family) -> bool {
    if backend_installed(backend, family) {
        return true;
    }
    let what = match backend {
        Backend::Legacy => "legacy",
        Backend::Nft | Backend::Auto => "nft",
    };
    skip_without(
        what,
        &format!(
            "{} (and its -save/-restore) is not installed: install the Debian package iptables",
            cli(backend, family)
        ),
    );
    false
}

/// The kernel must have IPv6 (inside a fresh namespace: /proc/net/if_inet6).
fn require_ipv6(ns: &Netns) -> bool {
    if ns.has_ipv6() {
        return true;
    }
    skip_without(
        "ipv6",
        "the kernel has no IPv6 (no /proc/net/if_inet6 in a new network namespace): boot \
         without ipv6.disable=1",
    );
    false
}

/// A user's own chain, which muon-init must never touch.
fn add_keepme(ns: &Netns, backend: Backend, family: Family) {
    let ipt = cli(backend, family);
    ns.ok(&ipt, &["-w", "-t", "nat", "-N", "KEEPME"]);
    ns.ok(
        &ipt,
        &[
            "-w", "-t", "nat", "-A", "KEEPME", "-p", "tcp", "--dport", "9", "-j", "RETURN",
        ],
    );
    ns.ok(&ipt, &["-w", "-t", "nat", "-A", "OUTPUT", "-j", "KEEPME"]);
}

/// The `-A` lines Muon should have put in the table, as the lib renders them: checking them
/// against `iptables-save` also proves the rules are written in iptables' canonical form.
fn expected_rule_lines(config: &Config, family: Family) -> Vec<String> {
    restore_payload(&ruleset(config, family), &NatState::default())
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

fn muon_rule_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains("MUON_"))
        .map(str::to_string)
        .collect()
}

fn assert_default_rules(save: &str, family: Family) {
    for chain in [
        "MUON_INBOUND",
        "MUON_IN_REDIRECT",
        "MUON_OUTPUT",
        "MUON_REDIRECT",
    ] {
        assert!(
            save.contains(&format!("\n:{chain} - [0:0]\n")),
            "{family}: chain {chain} missing:\n{save}"
        );
    }
    let mut got = muon_rule_lines(save);
    let mut want = expected_rule_lines(&Config::default(), family);
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "{family} rules differ from the generated ones:\n{save}"
    );
    assert!(save.contains("\n-A PREROUTING -p tcp -j MUON_INBOUND\n"));
    assert!(save.contains("\n-A OUTPUT -p tcp -j MUON_OUTPUT\n"));
}

fn assert_keepme(save: &str) {
    assert!(
        save.contains("\n:KEEPME - [0:0]\n"),
        "KEEPME chain gone:\n{save}"
    );
    assert!(
        save.contains("\n-A OUTPUT -j KEEPME\n"),
        "KEEPME jump gone:\n{save}"
    );
    assert!(
        save.contains("\n-A KEEPME -p tcp -m tcp --dport 9 -j RETURN\n"),
        "KEEPME rule gone:\n{save}"
    );
}

/// Apply defaults, apply again (idempotent), clean up (exactly), clean up again (no-op).
fn full_cycle(backend: Backend) {
    if !require_backend(backend, Family::V4) {
        return;
    }
    let ns = Netns::new();
    let v6 = require_ipv6(&ns) && require_backend(backend, Family::V6);
    let families: &[Family] = if v6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &f in families {
        add_keepme(&ns, backend, f);
    }
    let before: Vec<String> = families.iter().map(|&f| ns.nat(backend, f)).collect();

    let flag = backend_flag(backend);
    ns.init_ok(&[flag]);
    let applied: Vec<String> = families.iter().map(|&f| ns.nat(backend, f)).collect();
    for (&f, save) in families.iter().zip(&applied) {
        assert_default_rules(save, f);
        assert_keepme(save);
    }
    if v6 {
        assert!(ns.lo_v6_addrs().contains("::6/128"), "::6 not on lo");
    }
    // The kernel really has the jump, as iptables itself checks it.
    ns.ok(
        &cli(backend, Family::V4),
        &[
            "-w",
            "-t",
            "nat",
            "-C",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "MUON_OUTPUT",
        ],
    );

    ns.init_ok(&[flag]);
    for (&f, first) in families.iter().zip(&applied) {
        assert_eq!(
            &ns.nat(backend, f),
            first,
            "{f}: a second run changed the table"
        );
    }

    ns.init_ok(&[flag, "--cleanup"]);
    for (&f, orig) in families.iter().zip(&before) {
        let save = ns.nat(backend, f);
        assert!(!save.contains("MUON_"), "{f}: Muon left something:\n{save}");
        assert_eq!(&save, orig, "{f}: cleanup changed more than Muon's rules");
    }
    if v6 {
        assert!(ns.lo_v6_addrs().contains("::6/128"), "cleanup removed ::6");
    }

    ns.init_ok(&[flag, "--cleanup"]);
    for (&f, orig) in families.iter().zip(&before) {
        assert_eq!(
            &ns.nat(backend, f),
            orig,
            "{f}: a second cleanup changed the table"
        );
    }
}

#[test]
fn applies_idempotently_and_cleans_up_exactly_with_default_binaries() {
    full_cycle(Backend::Auto);
}

#[test]
fn applies_idempotently_and_cleans_up_exactly_with_nft() {
    full_cycle(Backend::Nft);
}

#[test]
fn applies_idempotently_and_cleans_up_exactly_with_legacy() {
    full_cycle(Backend::Legacy);
}

#[test]
fn dry_run_prints_the_payloads_and_changes_nothing() {
    let ns = Netns::new();
    add_keepme(&ns, Backend::Auto, Family::V4);
    let before = ns.nat(Backend::Auto, Family::V4);
    let before_v6 = ns.nat(Backend::Auto, Family::V6);
    let addrs = ns.lo_v6_addrs();

    let out = ns.init_ok(&["--dry-run", "--ipv6=on"]);
    let fresh = |f| restore_payload(&ruleset(&Config::default(), f), &NatState::default());
    assert!(
        out.contains(&format!(
            "# IPv4 payload for: iptables-restore --noflush --wait=10\n{}",
            fresh(Family::V4)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "# IPv6 payload for: ip6tables-restore --noflush --wait=10\n{}",
            fresh(Family::V6)
        )),
        "{out}"
    );
    assert!(out.contains("# would run: ip -6 addr replace ::6/128 dev lo nodad\n"));
    assert_eq!(ns.nat(Backend::Auto, Family::V4), before);
    assert_eq!(ns.nat(Backend::Auto, Family::V6), before_v6);
    assert_eq!(ns.lo_v6_addrs(), addrs, "dry run changed lo's addresses");

    // Once applied, the dry run shows what a re-run feeds: no jumps, they are there already.
    ns.init_ok(&["--ipv6=off"]);
    let applied = ns.nat(Backend::Auto, Family::V4);
    let out = ns.init_ok(&["--dry-run", "--ipv6=off"]);
    assert!(
        !out.contains("-A PREROUTING") && !out.contains("-A OUTPUT"),
        "{out}"
    );
    let out = ns.init_ok(&["--dry-run", "--ipv6=off", "--cleanup"]);
    assert!(out.contains("-D OUTPUT -p tcp -j MUON_OUTPUT\n"), "{out}");
    assert!(out.contains("-X MUON_REDIRECT\n"), "{out}");
    assert_eq!(ns.nat(Backend::Auto, Family::V4), applied);
}

/// Runs the binary inside `ns` as nobody.
fn init_as_nobody(ns: &Netns, args: &[&str]) -> Output {
    assert!(
        installed("setpriv"),
        "setpriv (util-linux) is needed to test running as non-root"
    );
    let mut full = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        BIN,
    ];
    full.extend_from_slice(args);
    ns.exec("setpriv", &full)
}

#[test]
fn dry_run_works_without_root() {
    let ns = Netns::new();
    let out = init_as_nobody(&ns, &["--dry-run", "--ipv6=on"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for f in [Family::V4, Family::V6] {
        let fresh = restore_payload(&ruleset(&Config::default(), f), &NatState::default());
        assert!(stdout.contains(&fresh), "{f} payload missing:\n{stdout}");
    }
    assert!(text(&out.stderr).contains("assuming no existing IPv4 rules"));
}

#[test]
fn refuses_to_run_without_root_and_applies_nothing() {
    let ns = Netns::new();
    let before = ns.nat(Backend::Auto, Family::V4);
    let out = init_as_nobody(&ns, &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("muon-init must run as root (it programs iptables)"),
        "{stderr}"
    );
    assert_eq!(ns.nat(Backend::Auto, Family::V4), before);
}

#[test]
fn bad_flags_exit_nonzero_and_apply_nothing() {
    let ns = Netns::new();
    let before = ns.nat(Backend::Auto, Family::V4);
    let before_v6 = ns.nat(Backend::Auto, Family::V6);
    let addrs = ns.lo_v6_addrs();

    let out = ns.init(&[
        "--outbound-port=0",
        "--include-outbound-cidrs=10.0.0.0/33",
        "--ipv6=maybe",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for problem in ["--outbound-port", "--include-outbound-cidrs", "--ipv6"] {
        assert!(
            stderr.contains(problem),
            "{problem} not reported:\n{stderr}"
        );
    }

    let out = ns.init(&["--no-such-flag"]);
    assert!(!out.status.success());

    assert_eq!(ns.nat(Backend::Auto, Family::V4), before);
    assert_eq!(ns.nat(Backend::Auto, Family::V6), before_v6);
    assert_eq!(ns.lo_v6_addrs(), addrs);
}

#[test]
fn config_change_replaces_the_rules_and_drops_stale_jumps() {
    let ns = Netns::new();
    ns.init_ok(&["--ipv6=off"]);
    let defaults = ns.nat(Backend::Auto, Family::V4);

    ns.init_ok(&["--ipv6=off", "--include-inbound-ports="]);
    let save = ns.nat(Backend::Auto, Family::V4);
    assert!(
        !save.contains("PREROUTING -p tcp -j MUON_INBOUND"),
        "{save}"
    );
    assert!(!save.contains(":MUON_INBOUND "), "{save}");
    let no_inbound = Config {
        include_inbound_ports: muon_init::Capture::Only(vec![]),
        ..Config::default()
    };
    let mut got = muon_rule_lines(&save);
    let mut want = expected_rule_lines(&no_inbound, Family::V4);
    got.sort();
    want.sort();
    assert_eq!(got, want);

    ns.init_ok(&[
        "--ipv6=off",
        "--include-inbound-ports=8080",
        "--exclude-outbound-ports=22",
    ]);
    let save = ns.nat(Backend::Auto, Family::V4);
    assert!(save.contains("\n-A MUON_INBOUND -p tcp -m tcp --dport 8080 -j MUON_IN_REDIRECT\n"));
    assert!(save.contains("\n-A MUON_OUTPUT -p tcp -m tcp --dport 22 -j RETURN\n"));
    assert_eq!(save.matches("-j MUON_INBOUND").count(), 1, "{save}");

    ns.init_ok(&["--ipv6=off"]);
    let save = ns.nat(Backend::Auto, Family::V4);
    let (mut a, mut b) = (muon_rule_lines(&save), muon_rule_lines(&defaults));
    a.sort();
    b.sort();
    assert_eq!(a, b, "back to defaults");
}

#[test]
fn ipv6_failure_rolls_ipv4_back() {
    let ns = Netns::new();
    if !require_ipv6(&ns) {
        return;
    }
    ns.init_ok(&[]);
    let v4_before = ns.nat(Backend::Auto, Family::V4);
    // A Muon-named chain that a user chain refers to cannot be deleted, so the IPv6 restore
    // fails after the IPv4 one succeeded.
    ns.ok("ip6tables", &["-w", "-t", "nat", "-N", "MUON_STALE"]);
    ns.ok("ip6tables", &["-w", "-t", "nat", "-N", "KEEPME6"]);
    ns.ok(
        "ip6tables",
        &["-w", "-t", "nat", "-A", "KEEPME6", "-j", "MUON_STALE"],
    );
    let v6_before = ns.nat(Backend::Auto, Family::V6);

    let out = ns.init(&["--include-inbound-ports=8080"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("IPv4 was rolled back"), "{stderr}");
    assert_eq!(
        ns.nat(Backend::Auto, Family::V4),
        v4_before,
        "IPv4 not rolled back"
    );
    assert_eq!(
        ns.nat(Backend::Auto, Family::V6),
        v6_before,
        "IPv6 half applied"
    );
}

#[test]
fn test_namespaces_are_separate_from_the_host() {
    // Guard for the guard: the helper really runs inside another namespace.
    let ns = Netns::new();
    let inside = ns.ok("readlink", &["/proc/self/ns/net"]);
    let outside = std::fs::read_link(Path::new("/proc/self/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    assert_ne!(inside.trim(), outside);
}
