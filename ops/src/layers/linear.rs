//! Megatron-style parallel linear layers (Shoeybi et al., arXiv 1909.08053, section 3).
//!
//! Hugging Face stores `Linear` weights as `[out, in]`. A column-parallel layer keeps a block of
//! output rows and never communicates; a row-parallel layer keeps a block of input columns, so its
//! outputs are partial sums that it all-reduces inside `forward`. Llama 2 has no biases.

use std::{ops::Range, sync::Arc};

use tch::Tensor;

use crate::{
    comm::Communicator,
    cpu::packed::PackedWeight,
    weights::{Slice, WeightLoader, WeightSpec},
    Result,
};

/// `y = x W_r^T` for this rank's rows `W_r` of `W`: the output is this rank's slice of features.
pub struct ColumnParallelLinear {
    weight: Weight,
}

impl ColumnParallelLinear {
    /// Loads rows `rows` of the `[out, in]` weight `spec`.
    pub fn load(loader: &WeightLoader, spec: &WeightSpec, rows: Range<usize>) -> Result<Self> {
        Ok(ColumnParallelLinear {
            weight: Weight::new(loader.load(spec, Slice::Rows(rows))?)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.project(x)
    }
}

/// `y = sum_r x_r W_r^T` where rank r holds input columns `W_r`: partial products, all-reduced.
pub struct RowParallelLinear {
    weight: Weight,
    comm: Arc<Communicator>,
}

impl RowParallelLinear {
    /// Loads columns `columns` of the `[out, in]` weight `spec`.
    pub fn load(
        loader: &WeightLoader,
        spec: &WeightSpec,
        columns: Range<usize>,
        comm: Arc<Communicator>,
    ) -> Result<Self> {
        Ok(RowParallelLinear {
            weight: Weight::new(loader.load(spec, Slice::Columns(columns))?)?,
            comm,
        })
    }

    /// `x` holds this rank's slice of the input features; the result is the full output,
    /// identical on every rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = self.weight.project(x)?;
        self.comm.all_reduce_sum(partial)
    }
}

/// A `[out, in]` weight as its products need it: packed for Caravan's CPU kernel where that
/// runs (f32, bf16 or f16 on a CPU with AVX2), else dense for libtorch (GPUs, other CPUs).
pub(crate) enum Weight {
    Packed(PackedWeight),
    Dense(Tensor),
}

impl Weight {
    pub(crate) fn new(dense: Tensor) -> Result<Weight> {
        Ok(match PackedWeight::pack(&dense)? {
            Some(packed) => Weight::Packed(packed),
            None => Weight::Dense(dense.f_contiguous()?),
        })
    }

    /// `x W^T`.
    pub(crate) fn project(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Packed(w) => w.linear(x),
            Weight::Dense(w) => Ok(x.f_linear::<Tensor>(w, None)?),
        }
    }
}
