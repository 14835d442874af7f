//! Turns "what should be there" and "what is there" into one `iptables-restore --noflush`
//! payload, so each family changes in a single atomic transaction.
//!
//! Pure: the same [`Ruleset`] and [`NatState`] always give the same text, which is what the
//! golden files pin down. Apply, re-apply, cleanup and rollback are all this one function with
//! a different desired ruleset (cleanup: the empty one; rollback: the state before).

use crate::rules::Ruleset;
use crate::state::NatState;

/// The payload that moves Muon's part of a nat table from `existing` to `desired`, leaving
/// every other chain and rule alone.
///
/// - Declaring a chain (`:NAME - [0:0]`) under `--noflush` creates it or flushes it, so the
///   desired chains are rewritten from scratch on every run.
/// - Jumps from PREROUTING/OUTPUT are not in a Muon chain and would be duplicated by a plain
///   append, so only missing ones are added; Muon jumps that are not desired (or duplicates)
///   are deleted.
/// - Muon chains that are no longer desired are flushed and then deleted, after the jumps
///   into them are gone (a referenced chain cannot be deleted).
pub fn restore_payload(desired: &Ruleset, existing: &NatState) -> String {
    let mut out = String::from("*nat\n");
    for chain in &desired.chains {
        out.push_str(&format!(":{} - [0:0]\n", chain.name));
    }

    // Pair each desired jump with at most one existing identical rule; every unpaired
    // existing jump is stale.
    let mut present = vec![false; desired.jumps.len()];
    for jump in &existing.jumps {
        let pair = desired
            .jumps
            .iter()
            .enumerate()
            .position(|(i, d)| !present[i] && d == jump);
        match pair {
            Some(i) => present[i] = true,
            None => out.push_str(&format!("-D {} {}\n", jump.from, jump.spec)),
        }
    }

    let stale: Vec<&str> = existing
        .chains
        .iter()
        .map(|c| c.name.as_str())
        .filter(|name| !desired.chains.iter().any(|d| d.name == *name))
        .collect();
    for name in &stale {
        out.push_str(&format!("-F {name}\n"));
    }
    for name in &stale {
        out.push_str(&format!("-X {name}\n"));
    }

    for chain in &desired.chains {
        for rule in &chain.rules {
            out.push_str(&format!("-A {} {}\n", chain.name, rule));
        }
    }
    for (jump, present) in desired.jumps.iter().zip(present) {
        if !present {
            out.push_str(&format!("-A {} {}\n", jump.from, jump.spec));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The payload that removes everything of Muon's from the table.
pub fn cleanup_payload(existing: &NatState) -> String {
    restore_payload(&Ruleset::default(), existing)
}
