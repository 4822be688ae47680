//! What every Caravan process shares besides the wire contract (`caravan-proto`): [`telemetry`]
//! (structured logs, OpenTelemetry traces across processes), [`tls`] (certificate files, their
//! flags, and the rustls configurations of the gRPC channels and etcd), and [`units`] (byte sizes
//! and durations in flags).

pub mod telemetry;
pub mod tls;
pub mod units;
