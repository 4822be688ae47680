//! Megatron-style parallel linear layers (Shoeybi et al., arXiv 1909.08053, section 3).
//!
//! Hugging Face stores `Linear` weights as `[out, in]`. A column-parallel layer keeps a block of
//! output rows and never communicates; a row-parallel layer keeps a block of input columns, so its
//! outputs are partial sums that it all-reduces inside `forward`. Llama 2 has no biases.

use std::{ops::Range, sync::Arc};

use tch::Tensor;

use crate::{
    comm::Communicator,
    cpu,
    weights::{Slice, WeightLoader, WeightSpec},
    Result,
};

/// `y = x W_r^T` for this rank's rows `W_r` of `W`: the output is this rank's slice of features.
pub struct ColumnParallelLinear {
    weight: Tensor,
}

impl ColumnParallelLinear {
    /// Loads rows `rows` of the `[out, in]` weight `spec`.
    pub fn load(loader: &WeightLoader, spec: &WeightSpec, rows: Range<usize>) -> Result<Self> {
        Ok(ColumnParallelLinear {
            weight: loader.load(spec, Slice::Rows(rows))?.f_contiguous()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        project(x, &self.weight)
    }
}

/// `y = sum_r x_r W_r^T` where rank r holds input columns `W_r`: partial products, all-reduced.
pub struct RowParallelLinear {
    weight: Tensor,
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
            weight: loader.load(spec, Slice::Columns(columns))?.f_contiguous()?,
            comm,
        })
    }

    /// `x` holds this rank's slice of the input features; the result is the full output,
    /// identical on every rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = project(x, &self.weight)?;
        self.comm.all_reduce_sum(partial)
    }
}

/// `x W^T`: a decode step's few rows through [`cpu::gemv`], everything else through libtorch.
pub(crate) fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    match cpu::gemv::linear(x, weight)? {
        Some(y) => Ok(y),
        None => Ok(x.f_linear::<Tensor>(weight, None)?),
    }
}
