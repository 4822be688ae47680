//! Megatron-style parallel linear layers (Shoeybi et al., arXiv 1909.08053, section 3).
//!
//! Hugging Face stores `Linear` weights as `[out, in]`. A column-parallel layer keeps a block of
//! output rows and never communicates; a row-parallel layer keeps a block of input columns, so its
//! outputs are partial sums that it all-reduces inside `forward`. Llama 2 has no biases.

use std::{ops::Range, sync::Arc};

use tch::Tensor;

use crate::{
    comm::Communicator,
    cpu::{
        packed::PackedWeight,
        quantized::{Format, QuantizedWeight},
    },
    weights::{Slice, WeightLoader, WeightSpec},
    Quantization, Result,
};

/// `y = x W_r^T` for this rank's rows `W_r` of `W`: the output is this rank's slice of features.
pub struct ColumnParallelLinear {
    weight: Weight,
}

impl ColumnParallelLinear {
    /// Loads rows `rows` of the `[out, in]` weight `spec`.
    pub fn load(loader: &WeightLoader, spec: &WeightSpec, rows: Range<usize>) -> Result<Self> {
        Ok(ColumnParallelLinear {
            weight: Weight::new(
                loader.load(spec, Slice::Rows(rows))?,
                loader.quantization().map(Quantization::layers),
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.project(x)
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// What computes its products, in words ([`Weight::kernel`]).
    pub fn kernel(&self) -> String {
        self.weight.kernel()
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
            weight: Weight::new(
                loader.load(spec, Slice::Columns(columns))?,
                loader.quantization().map(Quantization::layers),
            )?,
            comm,
        })
    }

    /// `x` holds this rank's slice of the input features; the result is the full output,
    /// identical on every rank.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = self.weight.project(x)?;
        self.comm.all_reduce_sum(partial)
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// What computes its products, in words ([`Weight::kernel`]).
    pub fn kernel(&self) -> String {
        self.weight.kernel()
    }
}

/// A `[out, in]` weight as its products need it: quantized when asked (Caravan's CPU kernels
/// only, for now), else packed for Caravan's CPU kernel where that runs (f32, bf16 or f16 on a
/// CPU with AVX2), else dense for libtorch (GPUs, other CPUs).
pub(crate) enum Weight {
    Quantized(QuantizedWeight),
    Packed(PackedWeight),
    Dense(Tensor),
}

impl Weight {
    /// `dense` (in the compute dtype) stored in `format`, or as the compute dtype.
    pub(crate) fn new(dense: Tensor, format: Option<Format>) -> Result<Weight> {
        if let Some(format) = format {
            let kind = dense.kind();
            return Ok(Weight::Quantized(QuantizedWeight::quantize(
                &dense, format, kind,
            )?));
        }
        Ok(match PackedWeight::pack(&dense)? {
            Some(packed) => Weight::Packed(packed),
            None => Weight::Dense(dense.f_contiguous()?),
        })
    }

    /// `x W^T`.
    pub(crate) fn project(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Quantized(w) => w.linear(x),
            Weight::Packed(w) => w.linear(x),
            Weight::Dense(w) => Ok(x.f_linear::<Tensor>(w, None)?),
        }
    }

    /// What computes its products, in words: Caravan's loop, or libtorch (on any device).
    pub(crate) fn kernel(&self) -> String {
        match self {
            Weight::Quantized(w) => w.kernel(),
            Weight::Packed(w) => w.kernel_loop().name().into(),
            Weight::Dense(_) => "libtorch".into(),
        }
    }

    /// Bytes the weight holds.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Weight::Quantized(w) => w.bytes(),
            Weight::Packed(w) => w.bytes(),
            Weight::Dense(w) => w.numel() * w.kind().elt_size_in_bytes(),
        }
    }
}
