//! The balancer's pick on its own (`cargo bench -p muon-proxy --bench pick`): 100 endpoints
//! with latency estimates and requests in flight, picked by peak-EWMA, least request and
//! round robin, first through `balance::pick` over a plain `Candidates`, then through the
//! table's `Backends::pick` (what the data path calls: the locality level in use and the
//! per-level counter included). The target is under 200 ns per pick for 100 endpoints.

use criterion::{criterion_group, criterion_main, Criterion};
use muon_core::resource::traffic::{LoadBalancer, Traffic};
use muon_core::{Endpoint, Protocol, ServiceEntry, ServicePort, ServiceTable};
use muon_proxy::balance::{self, Candidates, LevelPolicy, Tried, LEVELS};
use muon_proxy::endpoint::{BalancerState, EndpointState};
use muon_proxy::model::Algorithm;
use muon_proxy::table::Table;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;

const ENDPOINTS: usize = 100;

/// 100 endpoints in one locality level, weights 1..=3, latencies 1–10 ms, a few requests in
/// flight on some.
struct Eps {
    states: Vec<EndpointState>,
    cumulative: Vec<u64>,
    ends: [usize; LEVELS],
}

impl Eps {
    fn new(balancer: &BalancerState) -> Eps {
        let states: Vec<EndpointState> = (0..ENDPOINTS).map(|_| Default::default()).collect();
        let mut cumulative = Vec::with_capacity(ENDPOINTS);
        let mut sum = 0;
        for (i, s) in states.iter().enumerate() {
            sum += 1 + (i % 3) as u64;
            cumulative.push(sum);
            s.observe(1_000_000 + (i as u64 * 7919 % 9) * 1_000_000, balancer);
            s.in_flight.store((i % 4) as u64, Ordering::Relaxed);
        }
        Eps {
            states,
            cumulative,
            ends: [ENDPOINTS; LEVELS],
        }
    }
}

impl Candidates for Eps {
    fn len(&self) -> usize {
        self.states.len()
    }
    fn state(&self, i: usize) -> &EndpointState {
        &self.states[i]
    }
    fn cumulative(&self, i: usize) -> u64 {
        self.cumulative[i]
    }
    fn ends(&self) -> &[usize; LEVELS] {
        &self.ends
    }
}

/// A service of 100 endpoints, balanced by `algorithm`, compiled into a table of its own.
fn table(algorithm: Algorithm) -> Table {
    let endpoints = (0..ENDPOINTS)
        .map(|i| Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 2) as u8)),
            pod: format!("web-{i}"),
            zone: None,
            region: None,
            cloud: None,
            weight: Some(1 + (i % 3) as u32),
            meshed: true,
        })
        .collect();
    let t = ServiceTable {
        services: vec![ServiceEntry {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec![IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                protocol: Some(Protocol::Http),
            }],
            endpoints,
            traffic: Some(Traffic {
                load_balancer: Some(LoadBalancer {
                    algorithm: Some(algorithm.as_str().into()),
                }),
                ..Default::default()
            }),
            retry_constraint: None,
        }],
    };
    Table::from_service_table(&t)
}

fn bench(c: &mut Criterion) {
    let levels = LevelPolicy {
        enabled: true,
        failover_below: 70,
        spill_across_clouds: false,
    };
    let tried = Tried::default();
    let mut g = c.benchmark_group("pick_100_endpoints");
    for alg in [
        Algorithm::PeakEwma,
        Algorithm::LeastRequest,
        Algorithm::RoundRobin,
    ] {
        let balancer = BalancerState::default();
        let eps = Eps::new(&balancer);
        assert!(balance::pick(&eps, &balancer, alg, levels, &tried).is_some());
        g.bench_function(format!("balance_pick/{}", alg.as_str()), |b| {
            b.iter(|| balance::pick(black_box(&eps), &balancer, alg, levels, black_box(&tried)))
        });
    }
    for alg in [
        Algorithm::PeakEwma,
        Algorithm::LeastRequest,
        Algorithm::RoundRobin,
    ] {
        let t = table(alg);
        let target = t
            .lookup(SocketAddr::from(([198, 19, 0, 1], 80)))
            .expect("the service's port");
        let backends = &target.backends;
        assert_eq!(backends.endpoints.len(), ENDPOINTS);
        assert_eq!(backends.traffic.algorithm, alg);
        for (i, ep) in backends.endpoints.iter().enumerate() {
            ep.state.observe(
                1_000_000 + (i as u64 * 7919 % 9) * 1_000_000,
                &backends.balancer,
            );
        }
        g.bench_function(format!("backends_pick/{}", alg.as_str()), |b| {
            b.iter(|| backends.pick(black_box(&tried)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
