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
}

/// Which rows of the step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSelection {
    /// Every token (golden tests, prompt log-probabilities).
    AllTokens,
    /// The last token of each sequence (generation).
    LastTokens,
}

/// Per-sequence attention indices.
pub struct SequenceAttention {
    /// Rows of this sequence's new tokens in the flat batch.
    pub offset: i64,
    pub len: i64,
    /// Cache slots of positions `0..context_len`.
    pub context_slots: Tensor,
    /// `[len, context_len]` boolean (true = attend), when neither trivial nor square-causal.
    pub mask: Option<Tensor>,
    /// Square causal attention (a whole prompt at once).
    pub causal: bool,
}

/// The single-token (decode) sequences of a step, attended in one batched call: each one's
/// context is gathered into a row padded to the longest, and the padding masked out.
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
pub struct StepLimits {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl StepInputs {
    pub fn new(
        batch: &[SequenceStep],
        selection: LogitsSelection,
        limits: &StepLimits,
        rotary: &RotaryEmbedding,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if batch.is_empty() {
            return Err(Error::InvalidBatch("no sequences".into()));
        }
        let bs = limits.block_size;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        let mut sequences = Vec::with_capacity(batch.len());
        // (index in `sequences`, row, context slots) of single-token sequences.
        let mut decode_contexts: Vec<(usize, i64, Vec<i64>)> = Vec::new();
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
                .find(|&&t| t < 0 || t as usize >= limits.vocab_size)
            {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: token id {bad} is outside the vocabulary (0..{})",
                    limits.vocab_size
                )));
            }
            let context = seq.start_position + len;
            if context > limits.max_positions {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: {context} tokens exceed the model's context of {}",
                    limits.max_positions
                )));
            }
            if seq.block_table.len() * bs < context {
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
            let slot = |p: usize| (seq.block_table[p / bs] as usize * bs + p % bs) as i64;
            let offset = tokens.len() as i64;
            tokens.extend_from_slice(&seq.tokens);
            positions.extend((seq.start_position..context).map(|p| p as i64));
            slots.extend((seq.start_position..context).map(slot));
            match selection {
                LogitsSelection::AllTokens => logit_rows.extend(offset..offset + len as i64),
                LogitsSelection::LastTokens => logit_rows.push(offset + len as i64 - 1),
            }
            let context_slots: Vec<i64> = (0..context).map(slot).collect();
            if len == 1 {
                decode_contexts.push((sequences.len(), offset, context_slots.clone()));
            }
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
                offset,
                len: len as i64,
                context_slots: Tensor::f_from_slice(&context_slots)?.f_to_device(device)?,
                mask,
                causal,
            });
        }
        let decodes = if decode_contexts.len() >= 2 {
            let longest = decode_contexts
                .iter()
                .map(|(_, _, c)| c.len())
                .max()
                .unwrap_or(1);
            let d = decode_contexts.len();
            let mut slots = Vec::with_capacity(d * longest);
            let mut mask = Vec::with_capacity(d * longest);
            for (_, _, context) in &decode_contexts {
                slots.extend_from_slice(context);
                slots.extend(std::iter::repeat_n(context[0], longest - context.len()));
                mask.extend(std::iter::repeat_n(true, context.len()));
                mask.extend(std::iter::repeat_n(false, longest - context.len()));
            }
            let rows: Vec<i64> = decode_contexts.iter().map(|(_, o, _)| *o).collect();
            Some(DecodeBatch {
                members: decode_contexts.iter().map(|(i, _, _)| *i).collect(),
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
        let positions = Tensor::f_from_slice(&positions)?.f_to_device(device)?;
        let (cos, sin) = rotary.tables(&positions, kind)?;
        Ok(StepInputs {
            decodes,
            tokens: Tensor::f_from_slice(&tokens)?.f_to_device(device)?,
            slot_mapping: Tensor::f_from_slice(&slots)?.f_to_device(device)?,
            sequences,
            logit_rows: Tensor::f_from_slice(&logit_rows)?.f_to_device(device)?,
            cos,
            sin,
        })
    }
}
