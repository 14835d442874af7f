//! State that outlives a table: per endpoint (in-flight requests, later latency estimates,
//! ejections and connection pools) and per balancer (the round-robin position).
//!
//! Tables are compiled anew for every change the control plane sends, but an endpoint that is
//! in the old table and the new one is the same endpoint: its state is looked up here by
//! (service, address, identity) when the new table is compiled, so a republish resets
//! nothing. Only the compiling thread touches [`Registry`]; the data path holds `Arc`s of the
//! states and updates them with atomics.

use crate::balance::RoundRobin;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What identifies an endpoint across tables. An identity change makes a new endpoint: a
/// connection made for one identity is never reused for another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub service: Arc<str>,
    pub addr: SocketAddr,
    pub identity: Arc<str>,
}

/// The live state of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests (or connections) currently sent to it.
    pub in_flight: AtomicU64,
    /// Its connections, shared by every request to it.
    pub pool: crate::http::pool::Pool,
    /// The cipher suite of the mutual TLS its connections negotiated (for access events).
    pub tls_cipher: std::sync::OnceLock<&'static str>,
}

impl EndpointState {
    /// Counts one request in flight to this endpoint until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight to an endpoint (see [`EndpointState::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live state of one balancer: a service's endpoints at one target port.
#[derive(Debug, Default)]
pub struct BalancerState {
    pub rr: RoundRobin,
}

/// Every live state, keyed; rebuilt by each compile so that states of endpoints that left
/// are dropped once the last table using them is gone.
#[derive(Debug, Default)]
pub struct Registry {
    endpoints: HashMap<EndpointKey, Arc<EndpointState>>,
    balancers: HashMap<(Arc<str>, u16), Arc<BalancerState>>,
}

impl Registry {
    /// Starts a compile: states are taken from `self` as they are asked for, and what was
    /// not asked for is dropped by [`Carry::finish`].
    pub fn carry(&mut self) -> Carry<'_> {
        Carry {
            old: self,
            next: Registry::default(),
        }
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }
}

/// One compile's view of the registry.
pub struct Carry<'a> {
    old: &'a mut Registry,
    next: Registry,
}

impl Carry<'_> {
    pub fn endpoint(&mut self, key: EndpointKey) -> Arc<EndpointState> {
        if let Some(s) = self.next.endpoints.get(&key) {
            return s.clone();
        }
        let state = self.old.endpoints.remove(&key).unwrap_or_default();
        self.next.endpoints.insert(key, state.clone());
        state
    }

    pub fn balancer(&mut self, service: &Arc<str>, target_port: u16) -> Arc<BalancerState> {
        let key = (service.clone(), target_port);
        if let Some(s) = self.next.balancers.get(&key) {
            return s.clone();
        }
        let state = self.old.balancers.remove(&key).unwrap_or_default();
        self.next.balancers.insert(key, state.clone());
        state
    }

    /// Keeps exactly the states this compile asked for.
    pub fn finish(self) {
        *self.old = self.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str, identity: &str) -> EndpointKey {
        EndpointKey {
            service: "web.shop".into(),
            addr: addr.parse().unwrap(),
            identity: identity.into(),
        }
    }

    #[test]
    fn states_survive_a_recompile_and_leave_with_their_endpoint() {
        let mut reg = Registry::default();
        let mut c = reg.carry();
        let a = c.endpoint(key("198.18.0.2:80", "spiffe://a"));
        let b = c.endpoint(key("198.18.0.3:80", "spiffe://a"));
        let rr = c.balancer(&"web.shop".into(), 80);
        c.finish();
        a.in_flight.fetch_add(3, Ordering::Relaxed);
        rr.rr.order(2).next();

        let mut c = reg.carry();
        let a2 = c.endpoint(key("198.18.0.2:80", "spiffe://a"));
        // Same address, other identity: another endpoint.
        let b2 = c.endpoint(key("198.18.0.3:80", "spiffe://b"));
        let rr2 = c.balancer(&"web.shop".into(), 80);
        c.finish();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.in_flight.load(Ordering::Relaxed), 3);
        assert!(!Arc::ptr_eq(&b, &b2));
        assert!(Arc::ptr_eq(&rr, &rr2));
        assert_eq!(reg.endpoints(), 2);
    }
}
