//! What one forward step computes: a batch of sequences, each with new tokens and a block table.
//!
//! Prefill (many new tokens) and decode (one) are the same shape here, so a step can mix them.
//! [`StepInputs`] turns a batch into the index tensors every layer shares, after checking it
//! against the model and the cache: a bad batch is an error, never a crash inside libtorch.

use tch::{Device, Kind, Tensor};

use crate::{layers::RotaryEmbedding, Error, Result};

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceStep {
    /// Token ids to process this step (the whole prompt, a prompt chunk, or one decoded token).
    pub tokens: Vec<i64>,
    /// Position of `tokens[0]`: how many tokens of this sequence are already in the cache.
    pub start_position: usize,
    /// Cache blocks holding positions `0..start_position + tokens.len()`, in order.
    pub block_table: Vec<u32>,
    /// Every one of its rows gets logits, whatever the selection (prompt log-probabilities).
    pub all_logits: bool,
}

/// Which rows of the step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSelection {
    /// Every token (golden tests, prompt log-probabilities).
    AllTokens,
    /// The last token of each sequence (generation), and every token of the sequences that ask
    /// for all their logits ([`SequenceStep::all_logits`]).
    LastTokens,
}

/// Per-sequence attention indices.
pub struct SequenceAttention {
    /// Rows of this sequence's new tokens in the flat batch.
    pub offset: i64,
    pub len: i64,
    /// Cache slots of positions `0..context_len`.
    pub context_slots: Tensor,
    /// The same, on the host (CPU decode attention reads the pool at these).
    pub context: Vec<i64>,
    /// `[len, context_len]` boolean (true = attend), when neither trivial nor square-causal.
    pub mask: Option<Tensor>,
    /// Square causal attention (a whole prompt at once).
    pub causal: bool,
}

/// The single-token (decode) sequences of a step, for devices where they are attended in one
/// batched libtorch call: each one's context is gathered into a row padded to the longest, and
/// the padding masked out. CPUs with AVX2 read the pool in place instead (`cpu::attention`).
pub struct DecodeBatch {
    /// Indices into [`StepInputs::sequences`], in order.
    pub members: Vec<usize>,
    /// `[d]` rows of their tokens in the flat batch.
    pub rows: Tensor,
    /// `[d * longest]` cache slots, row-major; padding points at a real slot (masked out).
    pub slots: Tensor,
    /// `[d, 1, 1, longest]` boolean (true = attend).
    pub mask: Tensor,
    pub longest: i64,
}

/// Tensors shared by every layer for one step.
pub struct StepInputs {
    /// `[n]` flat token ids.
    pub tokens: Tensor,
    /// Cache slot of each new token.
    pub slot_mapping: Tensor,
    pub sequences: Vec<SequenceAttention>,
    /// When two or more sequences decode a single token: those, batched.
    pub decodes: Option<DecodeBatch>,
    /// Rows of the final hidden states that get logits.
    pub logit_rows: Tensor,
    /// RoPE tables for the new tokens' positions, `[n, 1, head_dim]` in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// What a batch is checked against.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// One sequence of a [`StepPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSequence {
    /// Rows of this sequence's new tokens in the flat batch.
    pub offset: usize,
    pub len: usize,
    /// Position of its first new token.
    pub start_position: usize,
    /// Cache slots of positions `0..start_position + len`.
    pub context_slots: Vec<i64>,
}

/// A batch checked against the model and the cache, as plain indices: everything
/// [`StepInputs`] needs, before any tensor exists. A batch that passes cannot index out of the
/// vocabulary, the RoPE tables or the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// `[n]` flat token ids, sequence after sequence.
    pub tokens: Vec<i64>,
    /// Position of each token.
    pub positions: Vec<i64>,
    /// Cache slot of each token.
    pub slots: Vec<i64>,
    /// Rows that get logits.
    pub logit_rows: Vec<i64>,
    pub sequences: Vec<PlannedSequence>,
}

impl StepPlan {
    pub fn new(
        batch: &[SequenceStep],
        selection: LogitsSelection,
        limits: &StepLimits,
    ) -> Result<Self> {
        if batch.is_empty() {
            return Err(Error::InvalidBatch("no sequences".into()));
        }
        if limits.block_size == 0 {
            return Err(Error::InvalidBatch("the cache's block size is 0".into()));
        }
        let bs = limits.block_size;
        let mut plan = StepPlan {
            tokens: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            logit_rows: Vec::new(),
            sequences: Vec::with_capacity(batch.len()),
        };
        for (i, seq) in batch.iter().enumerate() {
            let len = seq.tokens.len();
            if len == 0 {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has no new tokens"
                )));
            }
            if let Some(bad) = seq
                .tokens
                .iter()
                .find(|&&t| t < 0 || t as u64 >= limits.vocab_size as u64)
            {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: token id {bad} is outside the vocabulary (0..{})",
                    limits.vocab_size
                )));
            }
            let context = seq.start_position.saturating_add(len);
            if context > limits.max_positions {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: {context} tokens exceed the model's context of {}",
                    limits.max_positions
                )));
            }
            if seq.block_table.len().saturating_mul(bs) < context {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: block table of {} blocks cannot hold {context} tokens",
                    seq.block_table.len()
                )));
            }
            if let Some(bad) = seq
                .block_table
                .iter()
                .find(|&&b| b as usize >= limits.num_blocks)
            {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: block {bad} is outside the cache (0..{})",
                    limits.num_blocks
                )));
            }
            // Two positions of one sequence in one slot would overwrite each other's keys.
            let mut seen = std::collections::HashSet::with_capacity(seq.block_table.len());
            if let Some(twice) = seq.block_table.iter().find(|&&b| !seen.insert(b)) {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: block {twice} appears twice in its block table"
                )));
            }
            let slot = |p: usize| (seq.block_table[p / bs] as usize * bs + p % bs) as i64;
            let offset = plan.tokens.len();
            plan.tokens.extend_from_slice(&seq.tokens);
            plan.positions
                .extend((seq.start_position..context).map(|p| p as i64));
            plan.slots.extend((seq.start_position..context).map(slot));
            match selection {
                LogitsSelection::LastTokens if !seq.all_logits => {
                    plan.logit_rows.push((offset + len - 1) as i64)
                }
                _ => plan
                    .logit_rows
                    .extend((offset..offset + len).map(|r| r as i64)),
            }
            plan.sequences.push(PlannedSequence {
                offset,
                len,
                start_position: seq.start_position,
                context_slots: (0..context).map(slot).collect(),
            });
        }
        Ok(plan)
    }
}

impl StepInputs {
    /// Checks `batch` (see [`StepPlan`]) and builds its tensors on `device`.
    pub fn new(
        batch: &[SequenceStep],
        selection: LogitsSelection,
        limits: &StepLimits,
        rotary: &RotaryEmbedding,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let plan = StepPlan::new(batch, selection, limits)?;
        let mut sequences = Vec::with_capacity(plan.sequences.len());
        for seq in &plan.sequences {
            let (len, context) = (seq.len, seq.context_slots.len());
            let (mask, causal) = if len == 1 {
                (None, false)
            } else if len == context {
                (None, true)
            } else {
                // Query i sits at position start + i and sees keys 0..=start + i.
                let keys =
                    Tensor::f_arange(context as i64, (Kind::Int64, device))?.f_unsqueeze(0)?;
                let limit = Tensor::f_arange(len as i64, (Kind::Int64, device))?
                    .f_add_scalar(seq.start_position as i64)?
                    .f_unsqueeze(1)?;
                (Some(keys.f_le_tensor(&limit)?), false)
            };
            sequences.push(SequenceAttention {
                offset: seq.offset as i64,
                len: len as i64,
                context_slots: Tensor::f_from_slice(&seq.context_slots)?.f_to_device(device)?,
                context: seq.context_slots.clone(),
                mask,
                causal,
            });
        }
        // Single-token sequences attend in one batched call when there are two or more.
        let singles: Vec<usize> = (0..plan.sequences.len())
            .filter(|&i| plan.sequences[i].len == 1)
            .collect();
        let decodes = if singles.len() >= 2 {
            let longest = singles
                .iter()
                .map(|&i| plan.sequences[i].context_slots.len())
                .max()
                .unwrap_or(1);
            let d = singles.len();
            let mut slots = Vec::with_capacity(d * longest);
            let mut mask = Vec::with_capacity(d * longest);
            for &i in &singles {
                let context = &plan.sequences[i].context_slots;
                slots.extend_from_slice(context);
                slots.extend(std::iter::repeat_n(context[0], longest - context.len()));
                mask.extend(std::iter::repeat_n(true, context.len()));
                mask.extend(std::iter::repeat_n(false, longest - context.len()));
            }
            let rows: Vec<i64> = singles
                .iter()
                .map(|&i| plan.sequences[i].offset as i64)
                .collect();
            Some(DecodeBatch {
                members: singles,
                rows: Tensor::f_from_slice(&rows)?.f_to_device(device)?,
                slots: Tensor::f_from_slice(&slots)?.f_to_device(device)?,
                mask: Tensor::f_from_slice(&mask)?
                    .f_view([d as i64, 1, 1, longest as i64])?
                    .f_to_device(device)?,
                longest: longest as i64,
            })
        } else {
            None
        };
        let positions = Tensor::f_from_slice(&plan.positions)?.f_to_device(device)?;
        let (cos, sin) = rotary.tables(&positions, kind)?;
        Ok(StepInputs {
            decodes,
            tokens: Tensor::f_from_slice(&plan.tokens)?.f_to_device(device)?,
            slot_mapping: Tensor::f_from_slice(&plan.slots)?.f_to_device(device)?,
            sequences,
            logit_rows: Tensor::f_from_slice(&plan.logit_rows)?.f_to_device(device)?,
            cos,
            sin,
        })
    }
}
