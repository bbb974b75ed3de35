//! The ring's tests: real TCP connections (and shared-memory links) on 127.0.0.1.

use super::*;

/// `rank`'s seat in a ring over `peers`.
fn seat(peers: &[String], rank: usize) -> Seat<'_> {
    Seat {
        next_peer: &peers[(rank + 1) % peers.len()],
        rank,
        world: peers.len(),
    }
}
use crate::comm::handshake;

fn opts() -> RingOptions {
    test_options()
}

fn rings(world: usize, generation: u64) -> Vec<Ring> {
    test_rings(world, generation)
}

fn on_all<T: Send + 'static>(
    rings: Vec<Ring>,
    f: impl Fn(&mut Ring) -> T + Send + Sync + Clone + 'static,
) -> Vec<(Ring, T)> {
    let hs: Vec<_> = rings
        .into_iter()
        .map(|mut ring| {
            let f = f.clone();
            std::thread::spawn(move || {
                let out = f(&mut ring);
                (ring, out)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.37 - 11.0 + rank as f32 * 1e-3)
        .collect()
}

#[test]
fn all_reduce_is_exact_and_identical_on_every_rank() {
    for (world, shared_memory) in [(2, true), (3, true), (4, true), (2, false), (3, false)] {
        let mut rs = test_rings_with(
            world,
            1,
            &RingOptions {
                shared_memory,
                ..opts()
            },
        );
        assert!(
            rs.iter()
                .all(|r| r.tx.is_some() == shared_memory && r.rx.is_some() == shared_memory)
        );
        // Sizes that do not divide by the world size or the piece size, and 0 / 1.
        for n in [0, 1, 3, 5, 1001, PIECE_FLOATS + 3, 3 * PIECE_FLOATS + 17] {
            let out = on_all(rs, move |ring| {
                let mut b = input(ring.rank(), n);
                ring.all_reduce_sum(&mut b).unwrap();
                b
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
            let expected: Vec<f64> = (0..n)
                .map(|i| inputs.iter().map(|x| x[i] as f64).sum())
                .collect();
            for (_, got) in &out {
                assert_eq!(got.len(), n);
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "world {world} n {n}"
                    );
                }
                // Bitwise the same everywhere.
                assert_eq!(bytes(got), bytes(&out[0].1));
            }
            rs = out.into_iter().map(|(r, _)| r).collect();
        }
    }
}

/// Shared-memory files still in `/dev/shm` from this process.
fn our_shm_files() -> Vec<String> {
    let ours = format!("stackwise-ring-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&ours))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_rank_without_shared_memory_keeps_its_links_on_tcp_and_the_sums_agree() {
    // Rank 1 of 3 has STACKWISE_RING_SHM=0: the links 0 -> 1 and 1 -> 2 stay on TCP,
    // 2 -> 0 goes through shared memory; one ring mixes both.
    let rs = test_rings_each(3, 1, |rank| RingOptions {
        shared_memory: rank != 1,
        ..opts()
    });
    let links: Vec<(bool, bool)> = rs
        .iter()
        .map(|r| (r.tx.is_some(), r.rx.is_some()))
        .collect();
    assert_eq!(links, [(false, true), (false, false), (true, false)]);
    // Each file is removed as soon as its link has formed.
    assert!(our_shm_files().is_empty(), "{:?}", our_shm_files());
    let n = 2 * PIECE_FLOATS + 9;
    let out = on_all(rs, move |ring| {
        let mut b = input(ring.rank(), n);
        ring.all_reduce_sum(&mut b).unwrap();
        let mut c = if ring.rank() == 1 {
            input(5, n)
        } else {
            vec![0.0; n]
        };
        ring.broadcast(&mut c, 1).unwrap();
        (b, c)
    });
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, n)).collect();
    let want: Vec<f32> = (0..n).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
    for (_, (b, c)) in &out {
        for (g, e) in b.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0));
        }
        assert_eq!(bytes(b), bytes(&out[0].1.0));
        assert_eq!(c, &input(5, n));
    }
}

#[test]
fn all_reduce_is_deterministic_across_repeats() {
    let n = 2 * PIECE_FLOATS + 5;
    let mut rs = rings(3, 1);
    let mut first: Option<Vec<f32>> = None;
    for _ in 0..4 {
        let out = on_all(rs, move |ring| {
            let mut b: Vec<f32> = input(ring.rank(), n)
                .iter()
                .map(|x| x * 1.000_123)
                .collect();
            ring.all_reduce_sum(&mut b).unwrap();
            b
        });
        let got = out[0].1.clone();
        if let Some(f) = &first {
            assert_eq!(bytes(f), bytes(&got));
        }
        first = Some(got);
        rs = out.into_iter().map(|(r, _)| r).collect();
    }
}

#[test]
fn broadcast_and_barrier() {
    for world in 2..=4 {
        let rs = rings(world, 3);
        let out = on_all(rs, move |ring| {
            let root = world - 1;
            let mut b = if ring.rank() == root {
                input(9, 70_000)
            } else {
                vec![0.0; 70_000]
            };
            ring.broadcast(&mut b, root).unwrap();
            ring.barrier().unwrap();
            b
        });
        for (_, b) in &out {
            assert_eq!(b, &input(9, 70_000));
        }
    }
}

/// Connections a listener must drop: idle, garbage, a stale generation's hello, and a
/// current hello with the wrong key.
fn strangers(addr: SocketAddr) -> Vec<std::thread::JoinHandle<()>> {
    let stale = Hello {
        run_tag: 7,
        generation: 1,
        from_rank: 1,
        world: 2,
    };
    let current = Hello {
        generation: 2,
        ..stale
    };
    let wrong_key = RingKey::derive(Some("not the job token"), b"generation nonce");
    let mut out = Vec::new();
    out.push(std::thread::spawn(move || {
        let _idle = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }));
    out.push(std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&[0x5a; 4096]);
    }));
    out.push(std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = handshake::dial(&mut s, &opts().key, &stale);
    }));
    out.push(std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        assert!(handshake::dial(&mut s, &wrong_key, &current).is_err());
    }));
    out
}

#[test]
fn strangers_and_stale_peers_on_the_port_are_dropped_and_the_ring_still_forms() {
    let l = RingListener::bind("127.0.0.1:0").unwrap();
    let other = RingListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        l.local_addr().unwrap().to_string(),
        other.local_addr().unwrap().to_string(),
    ];
    // They knock before rank 1 does, and stay connected while the ring forms.
    let knocks = strangers(l.local_addr().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let p2 = peers.clone();
    let h = std::thread::spawn(move || {
        Ring::connect(&other, seat(&p2, 1), 7, 2, &opts(), Default::default()).unwrap()
    });
    let started = Instant::now();
    let mut r0 = Ring::connect(&l, seat(&peers, 0), 7, 2, &opts(), Default::default()).unwrap();
    // Not held up by the idle connection's handshake deadline.
    assert!(started.elapsed() < handshake::HANDSHAKE_TIMEOUT);
    let mut r1 = h.join().unwrap();
    let t = std::thread::spawn(move || {
        let mut b = vec![1.0f32; 10];
        r1.all_reduce_sum(&mut b).unwrap();
        b
    });
    let mut b = vec![2.0f32; 10];
    r0.all_reduce_sum(&mut b).unwrap();
    assert_eq!(b, vec![3.0; 10]);
    assert_eq!(t.join().unwrap(), vec![3.0; 10]);
    for k in knocks {
        k.join().unwrap();
    }
}

#[test]
fn a_ring_with_the_wrong_key_never_forms() {
    let l = RingListener::bind("127.0.0.1:0").unwrap();
    let other = RingListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        l.local_addr().unwrap().to_string(),
        other.local_addr().unwrap().to_string(),
    ];
    let quick = |token: &str| RingOptions {
        key: RingKey::derive(Some(token), b"generation nonce"),
        connect_timeout: Duration::from_secs(2),
        ..opts()
    };
    let p2 = peers.clone();
    let h = std::thread::spawn(move || {
        Ring::connect(&other, seat(&p2, 1), 7, 2, &quick("b"), Default::default()).is_err()
    });
    assert!(Ring::connect(&l, seat(&peers, 0), 7, 2, &quick("a"), Default::default()).is_err());
    assert!(h.join().unwrap());
}

#[test]
fn ranks_out_of_step_fail_with_both_collectives_named() {
    let mut rs = rings(2, 1);
    let mut r1 = rs.pop().unwrap();
    let mut r0 = rs.pop().unwrap();
    let t = std::thread::spawn(move || r1.broadcast(&mut [0.0; 10], 0));
    let e0 = r0.all_reduce_sum(&mut [1.0; 12]);
    let e1 = t.join().unwrap().unwrap_err().to_string();
    assert!(e0.is_err());
    assert!(
        e1.contains("rank 0 is at collective #1 (an all-reduce of 12 floats), rank 1 at collective #1 (a broadcast from rank 0 of 10 floats)"),
        "{e1}"
    );
}

#[test]
fn a_rank_that_never_joins_the_collective_times_out_instead_of_hanging() {
    let quick = RingOptions {
        collective_timeout: Duration::from_millis(300),
        ..opts()
    };
    let mut rs = test_rings_with(2, 1, &quick);
    let _idle = rs.pop().unwrap();
    let mut r0 = rs.pop().unwrap();
    let started = Instant::now();
    let e = r0.all_reduce_sum(&mut [1.0; 100]).unwrap_err();
    assert!(matches!(e, CommError::Timeout(_)), "{e}");
    assert!(e.to_string().contains(COLLECTIVE_TIMEOUT_ENV));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_dead_peer_fails_the_collective_instead_of_hanging() {
    for shared_memory in [true, false] {
        let mut rs = test_rings_with(
            3,
            1,
            &RingOptions {
                shared_memory,
                ..opts()
            },
        );
        let dead = rs.pop().unwrap();
        drop(dead);
        let started = Instant::now();
        let out = on_all(rs, |ring| {
            let mut b = vec![1.0f32; 300_000];
            ring.all_reduce_sum(&mut b).is_err()
        });
        assert!(out.iter().all(|(_, failed)| *failed));
        // Noticed from the sockets, long before the 20 s collective timeout.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shared memory: {shared_memory}"
        );
    }
}

#[test]
fn a_peer_that_dies_in_the_middle_of_a_collective_fails_it() {
    // Rank 1 takes part in the frame exchange, then stops reading and closes: rank 0's
    // writer is left waiting for free slots (or socket space) that never come.
    for shared_memory in [true, false] {
        let mut rs = test_rings_with(
            2,
            1,
            &RingOptions {
                shared_memory,
                ..opts()
            },
        );
        let r1 = rs.pop().unwrap();
        let mut r0 = rs.pop().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(r1);
        });
        let started = Instant::now();
        let e = r0
            .all_reduce_sum(&mut vec![1.0f32; 40 * PIECE_FLOATS])
            .unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, CommError::Io(_)), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shared memory: {shared_memory}"
        );
    }
}

#[test]
fn abort_unblocks_a_waiting_rank() {
    let mut rs = rings(2, 1);
    let _idle = rs.pop().unwrap(); // never joins the collective
    let mut r0 = rs.pop().unwrap();
    let abort = r0.abort_handle();
    let t = std::thread::spawn(move || r0.all_reduce_sum(&mut vec![1.0f32; 4_000_000]));
    std::thread::sleep(Duration::from_millis(200));
    abort.abort();
    assert!(matches!(t.join().unwrap(), Err(CommError::Aborted)));
}
