//! Golden files for rule generation: the exact `iptables-restore` payload for a set of
//! configurations and starting states. Review changes to `tests/golden/*.rules` in the diff;
//! regenerate them with `MUON_UPDATE_GOLDEN=1 cargo test -p muon-init --test golden`.

use std::path::PathBuf;

use clap::Parser;
use muon_init::{cleanup_payload, restore_payload, ruleset, Args, Config, Family, NatState};

fn config(flags: &[&str]) -> Config {
    let argv = std::iter::once("muon-init").chain(flags.iter().copied());
    let args = Args::try_parse_from(argv).unwrap_or_else(|e| panic!("bad test flags: {e}"));
    Config::from_args(&args).unwrap_or_else(|e| panic!("bad test config: {e}"))
}

/// The payload for a first run on a table with nothing of Muon's in it.
fn fresh(flags: &[&str], family: Family) -> String {
    restore_payload(&ruleset(&config(flags), family), &NatState::default())
}

/// The table as `iptables-save` prints it after the default config was applied, next to a
/// user's own chain that must never be touched.
fn default_applied_save() -> String {
    let applied = restore_payload(
        &ruleset(&Config::default(), Family::V4),
        &NatState::default(),
    );
    let rules: String = applied
        .lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with(':'))
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KEEPME - [0:0]\n{rules}\
         -A OUTPUT -j KEEPME\nCOMMIT\n"
    )
}

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.rules"));
    if std::env::var_os("MUON_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap_or(&path)).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with MUON_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs (MUON_UPDATE_GOLDEN=1 regenerates it):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn golden_default() {
    check("default", &fresh(&[], Family::V4));
}

#[test]
fn golden_uid_gid_custom() {
    check(
        "uid_gid_custom",
        &fresh(&["--proxy-uid", "2000", "--proxy-gid", "3000"], Family::V4),
    );
}

#[test]
fn golden_custom_proxy_ports() {
    check(
        "custom_proxy_ports",
        &fresh(
            &[
                "--outbound-port",
                "16001",
                "--inbound-port",
                "16006",
                "--health-port",
                "16020",
                "--admin-port",
                "16000",
            ],
            Family::V4,
        ),
    );
}

#[test]
fn golden_include_inbound_ports() {
    check(
        "include_inbound_ports",
        &fresh(&["--include-inbound-ports", "8080,9090"], Family::V4),
    );
}

const EXCLUDES: &[&str] = &[
    "--exclude-inbound-ports",
    "22,15020,8443",
    "--exclude-outbound-ports",
    "3306,5432",
    "--exclude-outbound-cidrs",
    "10.96.0.0/12,169.254.169.254,fd00::/8",
];

#[test]
fn golden_excludes() {
    check("excludes", &fresh(EXCLUDES, Family::V4));
}

#[test]
fn golden_excludes_ipv6() {
    check("excludes_ipv6", &fresh(EXCLUDES, Family::V6));
}

const INCLUDE_CIDRS: &[&str] = &[
    "--include-outbound-cidrs",
    "10.0.0.0/8,192.168.0.0/16,2001:db8::/32",
];

#[test]
fn golden_include_outbound_cidrs() {
    check("include_outbound_cidrs", &fresh(INCLUDE_CIDRS, Family::V4));
}

#[test]
fn golden_include_outbound_cidrs_ipv6() {
    check(
        "include_outbound_cidrs_ipv6",
        &fresh(INCLUDE_CIDRS, Family::V6),
    );
}

#[test]
fn golden_ipv6() {
    check("ipv6", &fresh(&[], Family::V6));
}

#[test]
fn golden_inbound_disabled() {
    check(
        "inbound_disabled",
        &fresh(&["--include-inbound-ports", ""], Family::V4),
    );
}

#[test]
fn golden_outbound_disabled() {
    check(
        "outbound_disabled",
        &fresh(&["--include-outbound-cidrs", ""], Family::V4),
    );
}

#[test]
fn ipv6_only_include_cidrs_turn_ipv4_outbound_off() {
    let rs = ruleset(
        &config(&["--include-outbound-cidrs", "2001:db8::/32"]),
        Family::V4,
    );
    assert!(rs.jumps.iter().all(|j| j.from != "OUTPUT"));
    assert!(rs.chains.iter().all(|c| c.name != "MUON_OUTPUT"));
}

#[test]
fn golden_cleanup() {
    let existing = NatState::parse(&default_applied_save());
    check("cleanup", &cleanup_payload(&existing));
}

#[test]
fn cleanup_of_a_clean_table_changes_nothing() {
    assert_eq!(cleanup_payload(&NatState::default()), "*nat\nCOMMIT\n");
}

#[test]
fn golden_rerun_adds_no_jumps() {
    let existing = NatState::parse(&default_applied_save());
    let payload = restore_payload(&ruleset(&Config::default(), Family::V4), &existing);
    assert!(!payload.contains("-A PREROUTING") && !payload.contains("-A OUTPUT"));
    check("rerun_default", &payload);
}

#[test]
fn golden_inbound_disabled_over_default() {
    let existing = NatState::parse(&default_applied_save());
    let config = config(&["--include-inbound-ports", ""]);
    check(
        "inbound_disabled_over_default",
        &restore_payload(&ruleset(&config, Family::V4), &existing),
    );
}

#[test]
fn duplicate_jumps_are_reduced_to_one() {
    let save = "*nat\n:MUON_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j MUON_OUTPUT\n\
                -A OUTPUT -p tcp -j MUON_OUTPUT\n-A OUTPUT -j MUON_OUTPUT\nCOMMIT\n";
    let payload = restore_payload(
        &ruleset(&Config::default(), Family::V4),
        &NatState::parse(save),
    );
    let deletes: Vec<&str> = payload.lines().filter(|l| l.starts_with("-D ")).collect();
    assert_eq!(
        deletes,
        [
            "-D OUTPUT -p tcp -j MUON_OUTPUT",
            "-D OUTPUT -j MUON_OUTPUT"
        ]
    );
    assert!(!payload.contains("-A OUTPUT"));
    assert!(payload.contains("-A PREROUTING -p tcp -j MUON_INBOUND"));
}

#[test]
fn rollback_restores_the_previous_state_exactly() {
    // Previous run: defaults. This run: inbound only on 8080; it is applied, then undone.
    let before = NatState::parse(&default_applied_save());
    let desired = ruleset(&config(&["--include-inbound-ports", "8080"]), Family::V4);
    let back = restore_payload(&before.to_ruleset(), &NatState::from_ruleset(&desired));
    // Undoing leaves the table as `before`: applying the default config again is a no-op
    // for the jumps and rewrites the chains to the same rules.
    let reapply = restore_payload(&ruleset(&Config::default(), Family::V4), &before);
    assert_eq!(back, reapply);
}
