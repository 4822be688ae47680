//! The wire contract between coordinator and workers, package `caravan.v1` (see
//! `proto/caravan/v1/*.proto`, where every RPC and field is documented).

/// Protocol version a coordinator and its workers must agree on.
pub const PROTOCOL_VERSION: &str = "caravan.v1";

/// Generated messages and services.
pub mod v1 {
    tonic::include_proto!("caravan.v1");
}

pub use v1::*;
