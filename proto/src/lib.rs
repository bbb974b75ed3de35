//! The coordinator/worker protocol `stackwise.v1`: the generated gRPC code (`pb`) and the
//! domain types (`model`) that every received message is validated into.

pub mod model;

/// Generated from `proto/stackwise/v1/coordinator.proto`.
pub mod pb {
    tonic::include_proto!("stackwise.v1");
}

/// Bumped on any incompatible change; a worker and coordinator must agree.
pub const PROTOCOL_VERSION: u32 = 4;

/// The metadata key of the shared token (`authorization: Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";

/// Pick rustls' crypto provider (ring) for gRPC TLS. The S3 client links a second provider
/// (aws-lc-rs), and with two linked rustls cannot choose on its own. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Compare secrets without an early exit, so timing does not reveal them.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `n` random bytes from the operating system, hex-encoded.
pub fn random_hex(n: usize) -> String {
    random_bytes(n).iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b
}
