//! The coordinator/worker protocol `stackwise.v1`: the generated gRPC code (`pb`) and the
//! domain types (`model`) that every received message is validated into.

pub mod model;

/// Generated from `proto/stackwise/v1/coordinator.proto`.
pub mod pb {
    tonic::include_proto!("stackwise.v1");
}

/// Bumped on any incompatible change; a worker and coordinator must agree.
pub const PROTOCOL_VERSION: u32 = 1;

/// The metadata key of the shared token (`authorization: Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";

/// Pick rustls' crypto provider (ring) for gRPC TLS. The S3 client links a second provider
/// (aws-lc-rs), and with two linked rustls cannot choose on its own. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
