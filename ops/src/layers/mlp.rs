//! The SwiGLU feed-forward block (Shazeer, arXiv 2002.05202): `down(silu(gate(x)) * up(x))`.
//!
//! gate and up are column parallel, so the element-wise product is local; down is row parallel
//! and ends with the block's all-reduce.

use std::{ops::Range, sync::Arc};

use tch::Tensor;

use crate::{
    comm::Communicator,
    layers::{ColumnParallelLinear, RowParallelLinear},
    weights::{WeightLoader, WeightSpec},
    Result,
};

pub struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

/// The checkpoint names and shapes of one layer's MLP weights.
pub struct MlpWeights {
    pub gate_proj: WeightSpec,
    pub up_proj: WeightSpec,
    pub down_proj: WeightSpec,
}

impl MlpWeights {
    pub fn new(prefix: &str, hidden: usize, intermediate: usize) -> Self {
        MlpWeights {
            gate_proj: WeightSpec::new(
                format!("{prefix}.gate_proj.weight"),
                &[intermediate, hidden],
            ),
            up_proj: WeightSpec::new(format!("{prefix}.up_proj.weight"), &[intermediate, hidden]),
            down_proj: WeightSpec::new(
                format!("{prefix}.down_proj.weight"),
                &[hidden, intermediate],
            ),
        }
    }

    pub fn all(&self) -> [&WeightSpec; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

impl Mlp {
    /// Loads this rank's `columns` of the intermediate width.
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }

    /// What computes each projection, in words.
    pub fn kernels(&self) -> [String; 3] {
        [
            self.gate_proj.kernel(),
            self.up_proj.kernel(),
            self.down_proj.kernel(),
        ]
    }

    pub fn load(
        loader: &WeightLoader,
        weights: &MlpWeights,
        columns: Range<usize>,
        comm: Arc<Communicator>,
    ) -> Result<Self> {
        Ok(Mlp {
            gate_proj: ColumnParallelLinear::load(loader, &weights.gate_proj, columns.clone())?,
            up_proj: ColumnParallelLinear::load(loader, &weights.up_proj, columns.clone())?,
            down_proj: RowParallelLinear::load(loader, &weights.down_proj, columns, comm)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.f_silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&gate.f_mul(&up)?)
    }
}
