//! Multi-head self-attention with grouped-query KV heads (Ainslie et al., arXiv 2305.13245) over
//! the paged KV cache.
//!
//! q, k and v are column parallel by head, so RoPE, the cache write and attention are local to a
//! rank; o_proj is row parallel and ends with the block's all-reduce. Each KV head serves
//! `q_heads / kv_heads` consecutive query heads (transformers' `repeat_kv`), and a rank's heads
//! keep that grouping: its query heads all belong to the KV heads it stores.

use std::sync::Arc;

use tch::Tensor;

use crate::{
    batch::StepInputs,
    comm::Communicator,
    cpu,
    kv_cache::LayerKv,
    layers::{ColumnParallelLinear, RotaryEmbedding, RowParallelLinear},
    weights::{WeightLoader, WeightSpec},
    Result, ShardLayout,
};

/// The checkpoint names and shapes of one layer's attention weights.
pub struct AttentionWeights {
    pub q_proj: WeightSpec,
    pub k_proj: WeightSpec,
    pub v_proj: WeightSpec,
    pub o_proj: WeightSpec,
}

impl AttentionWeights {
    pub fn new(
        prefix: &str,
        hidden: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let (q, kv) = (q_heads * head_dim, kv_heads * head_dim);
        AttentionWeights {
            q_proj: WeightSpec::new(format!("{prefix}.q_proj.weight"), &[q, hidden]),
            k_proj: WeightSpec::new(format!("{prefix}.k_proj.weight"), &[kv, hidden]),
            v_proj: WeightSpec::new(format!("{prefix}.v_proj.weight"), &[kv, hidden]),
            o_proj: WeightSpec::new(format!("{prefix}.o_proj.weight"), &[hidden, q]),
        }
    }

    pub fn all(&self) -> [&WeightSpec; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }
}

pub struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    q_heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
    }

    /// What computes each projection, in words.
    pub fn kernels(&self) -> [String; 4] {
        [
            self.q_proj.kernel(),
            self.k_proj.kernel(),
            self.v_proj.kernel(),
            self.o_proj.kernel(),
        ]
    }

    pub fn load(
        loader: &WeightLoader,
        weights: &AttentionWeights,
        layout: &ShardLayout,
        head_dim: usize,
        comm: Arc<Communicator>,
    ) -> Result<Self> {
        let rows = |heads: &std::ops::Range<usize>| heads.start * head_dim..heads.end * head_dim;
        let q_rows = rows(&layout.q_heads);
        let kv_rows = rows(&layout.kv_heads);
        Ok(Attention {
            q_proj: ColumnParallelLinear::load(loader, &weights.q_proj, q_rows.clone())?,
            k_proj: ColumnParallelLinear::load(loader, &weights.k_proj, kv_rows.clone())?,
            v_proj: ColumnParallelLinear::load(loader, &weights.v_proj, kv_rows)?,
            o_proj: RowParallelLinear::load(loader, &weights.o_proj, q_rows, comm)?,
            q_heads: layout.local_q_heads() as i64,
            kv_heads: layout.local_kv_heads() as i64,
            head_dim: head_dim as i64,
        })
    }

    /// `x`: `[n, hidden]` for the step's new tokens. Writes their keys and values into `cache`,
    /// attends each sequence to its context, and returns `[n, hidden]` (all-reduced).
    pub fn forward(&self, x: &Tensor, step: &StepInputs, cache: &mut LayerKv) -> Result<Tensor> {
        let n = x.size()[0];
        let q = self
            .q_proj
            .forward(x)?
            .f_view([n, self.q_heads, self.head_dim])?;
        let k = self
            .k_proj
            .forward(x)?
            .f_view([n, self.kv_heads, self.head_dim])?;
        let v = self
            .v_proj
            .forward(x)?
            .f_view([n, self.kv_heads, self.head_dim])?;
        let q = RotaryEmbedding::apply(&q, &step.cos, &step.sin)?;
        let k = RotaryEmbedding::apply(&k, &step.cos, &step.sin)?;
        let _ = cache.keys.f_index_copy_(0, &step.slot_mapping, &k)?;
        let _ = cache.values.f_index_copy_(0, &step.slot_mapping, &v)?;

        let group = self.q_heads / self.kv_heads;
        let repeat_kv = |t: Tensor, dim: i64| -> Result<Tensor> {
            Ok(if group > 1 {
                t.f_repeat_interleave_self_int(group, dim, None)?
            } else {
                t
            })
        };
        // Single-token sequences: on CPUs, attended over the pool in place (`cpu::attention`);
        // elsewhere, when there are two or more, in one batched SDPA call over a gathered,
        // padded context. Either way `decoded` is `(their indices in step.sequences, [d, -1])`.
        let singles: Vec<usize> = (0..step.sequences.len())
            .filter(|&i| step.sequences[i].len == 1)
            .collect();
        let in_place = match singles.is_empty() {
            true => None,
            false => {
                let decodes: Vec<cpu::attention::Decode> = singles
                    .iter()
                    .map(|&i| cpu::attention::Decode {
                        row: step.sequences[i].offset as usize,
                        context: &step.sequences[i].context,
                    })
                    .collect();
                cpu::attention::decode(&q, &cache.keys, &cache.values, &decodes)?
            }
        };
        let decoded = match (in_place, &step.decodes) {
            (Some(out), _) => Some((singles, out)),
            (None, None) => None,
            (None, Some(batch)) => {
                let d = batch.members.len() as i64;
                let q = q.f_index_select(0, &batch.rows)?.f_unsqueeze(2)?;
                let gather = |pool: &Tensor| -> Result<Tensor> {
                    Ok(pool
                        .f_index_select(0, &batch.slots)?
                        .f_view([d, batch.longest, self.kv_heads, self.head_dim])?
                        .f_permute([0, 2, 1, 3])?)
                };
                let k = gather(&cache.keys)?;
                let v = gather(&cache.values)?;
                let out = Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    Some(&batch.mask),
                    0.0,
                    false,
                    None,
                    true,
                )?;
                Some((batch.members.clone(), out.f_reshape([d, -1])?))
            }
        };
        if let Some((members, decoded)) = &decoded {
            if members.len() == step.sequences.len() {
                return self.o_proj.forward(decoded);
            }
        }
        let mut outputs = Vec::with_capacity(step.sequences.len());
        for (i, seq) in step.sequences.iter().enumerate() {
            if let Some((members, decoded)) = &decoded {
                if let Some(j) = members.iter().position(|&m| m == i) {
                    outputs.push(decoded.f_narrow(0, j as i64, 1)?);
                    continue;
                }
            }
            // [heads, tokens, head_dim], with a leading batch dimension of one.
            let q = q
                .f_narrow(0, seq.offset, seq.len)?
                .f_transpose(0, 1)?
                .f_unsqueeze(0)?;
            let context = |pool: &Tensor| -> Result<Tensor> {
                let t = pool
                    .f_index_select(0, &seq.context_slots)?
                    .f_transpose(0, 1)?;
                Ok(repeat_kv(t, 0)?.f_unsqueeze(0)?)
            };
            let k = context(&cache.keys)?;
            let v = context(&cache.values)?;
            let out = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                seq.mask.as_ref(),
                0.0,
                seq.causal,
                None,
                false,
            )?;
            outputs.push(
                out.f_squeeze_dim(0)?
                    .f_transpose(0, 1)?
                    .f_reshape([seq.len, -1])?,
            );
        }
        let attended = Tensor::f_cat(&outputs, 0)?;
        self.o_proj.forward(&attended)
    }
}
