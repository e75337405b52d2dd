//! One pick through the `Mutex<Selector>` an upstream group shares between
//! worker threads (issue 14: is the process-wide lock acceptable?), for
//! round-robin groups of 3, 30 and 300 peers, from 1 and 2 threads at once.
//! A pick here is what `Upstream::select` and a successful connection do to
//! the selector: lock, select, unlock, then report the connect and the close.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::balancer::{Method, PeerIdentity, PeerParams, Selector, Tried};

fn group(peers: usize) -> Mutex<Selector> {
    let params: Vec<PeerParams> = (0..peers)
        .map(|index| PeerParams {
            weight: 1 + (index % 5) as u32,
            max_conns: 0,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
        })
        .collect();
    let identities: Vec<PeerIdentity> = (0..peers)
        .map(|index| {
            let address = format!("10.0.{}.{}:24224", index / 250, index % 250);
            PeerIdentity {
                server: address.clone(),
                address,
            }
        })
        .collect();
    let health = params.iter().map(|_| Arc::default()).collect();
    Mutex::new(Selector::for_method(
        Method::RoundRobin,
        &identities,
        params,
        health,
    ))
}

fn pick(selector: &Mutex<Selector>) {
    let mut tried = Tried::default();
    let health = {
        let mut selector = selector.lock().unwrap();
        let index = selector
            .select(Instant::now(), &mut tried, b"")
            .expect("every peer is eligible");
        Arc::clone(selector.health(index))
    };
    health.connected(Instant::now());
    health.closed();
}

fn picks(c: &mut Criterion) {
    let mut bench = c.benchmark_group("pick");
    for peers in [3, 30, 300] {
        let selector = group(peers);
        for threads in [1u64, 2] {
            bench.throughput(Throughput::Elements(threads));
            bench.bench_with_input(
                BenchmarkId::new(format!("{threads}_threads"), peers),
                &selector,
                |b, selector| {
                    b.iter_custom(|iterations| {
                        let start = Instant::now();
                        std::thread::scope(|scope| {
                            for _ in 0..threads {
                                scope.spawn(|| {
                                    for _ in 0..iterations {
                                        pick(selector);
                                    }
                                });
                            }
                        });
                        start.elapsed()
                    });
                },
            );
        }
    }
    bench.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
