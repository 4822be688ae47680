//! Token embedding and LM head, replicated or split by vocabulary rows.
//!
//! Vocab-parallel embedding (Megatron): each rank holds `vocab / t` rows, looks up the tokens that
//! fall in its range, zeroes the rest, and an all-reduce assembles the full rows (exactly: only one
//! rank contributes a non-zero value per token). Vocab-parallel LM head: column parallel over the
//! vocabulary, then an all-gather so every rank holds identical full logits for sampling.

use std::{ops::Range, sync::Arc};

use tch::{Kind, Tensor};

use crate::{
    comm::Communicator,
    layers::linear::Weight,
    weights::{Slice, WeightLoader, WeightSpec},
    Quantization, Result,
};

fn load_table(
    loader: &WeightLoader,
    spec: &WeightSpec,
    rows: &Option<Range<usize>>,
) -> Result<Tensor> {
    match rows {
        Some(rows) => loader.load(spec, Slice::Rows(rows.clone())),
        None => loader.load(spec, Slice::Full),
    }
}

/// `model.embed_tokens`.
pub struct ParallelEmbedding {
    /// `[rows, hidden]`: the whole table, or this rank's rows.
    weight: Tensor,
    /// This rank's vocabulary rows; `None` when replicated.
    rows: Option<Range<usize>>,
    comm: Arc<Communicator>,
}

impl ParallelEmbedding {
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.weight.numel() * self.weight.kind().elt_size_in_bytes()
    }

    pub fn load(
        loader: &WeightLoader,
        spec: &WeightSpec,
        rows: Option<Range<usize>>,
        comm: Arc<Communicator>,
    ) -> Result<Self> {
        Ok(ParallelEmbedding {
            weight: load_table(loader, spec, &rows)?,
            rows,
            comm,
        })
    }

    /// `tokens` (`[n]`, int64, already checked against the vocabulary) to `[n, hidden]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let Some(rows) = &self.rows else {
            return Ok(Tensor::f_embedding(&self.weight, tokens, -1, false, false)?);
        };
        let local = tokens.f_sub_scalar(rows.start as i64)?;
        let mine = tokens
            .f_ge(rows.start as i64)?
            .f_logical_and(&tokens.f_lt(rows.end as i64)?)?;
        let index = local.f_where_scalarother(&mine, 0)?;
        let embedded = Tensor::f_embedding(&self.weight, &index, -1, false, false)?;
        let masked = embedded.f_mul(&mine.f_unsqueeze(-1)?.f_to_kind(embedded.kind())?)?;
        self.comm.all_reduce_sum(masked)
    }
}

/// `lm_head`: hidden states to logits over the whole vocabulary, f32, identical on every rank.
pub struct LmHead {
    weight: Weight,
    parallel: bool,
    comm: Arc<Communicator>,
}

impl LmHead {
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// What computes its product, in words.
    pub fn kernel(&self) -> String {
        self.weight.kernel()
    }

    pub fn load(
        loader: &WeightLoader,
        spec: &WeightSpec,
        rows: Option<Range<usize>>,
        comm: Arc<Communicator>,
    ) -> Result<Self> {
        Ok(LmHead {
            weight: Weight::new(
                load_table(loader, spec, &rows)?,
                loader.quantization().map(Quantization::lm_head),
            )?,
            parallel: rows.is_some(),
            comm,
        })
    }

    /// `x` (`[m, hidden]`) to `[m, vocab]` logits in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let local = self.weight.project(x)?;
        let logits = if self.parallel {
            // [t, m, vocab/t] -> [m, t, vocab/t] -> [m, vocab], rank order = vocabulary order.
            let gathered = self.comm.all_gather(&local)?;
            let m = local.size()[0];
            gathered.f_permute([1, 0, 2])?.f_reshape([m, -1])?
        } else {
            local
        };
        Ok(logits.f_to_kind(Kind::Float)?)
    }
}
