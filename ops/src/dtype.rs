//! The libtorch kind of each floating-point format (the formats themselves are
//! `caravan_checkpoint::DType`, which knows nothing of libtorch).

use caravan_checkpoint::DType;

/// The libtorch kind a format computes in.
pub trait TorchKind {
    fn kind(self) -> tch::Kind;
}

impl TorchKind for DType {
    fn kind(self) -> tch::Kind {
        match self {
            DType::F32 => tch::Kind::Float,
            DType::F16 => tch::Kind::Half,
            DType::BF16 => tch::Kind::BFloat16,
        }
    }
}
