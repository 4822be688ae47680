//! Which slice of every weight a tensor-parallel rank owns (Megatron-style, GQA-aware).
//!
//! Query heads and MLP columns split evenly across ranks. KV heads split evenly when there are at
//! least as many as ranks; with fewer KV heads than ranks (70B at t=16, or MQA), each rank keeps the
//! one KV head its query heads attend to, replicated on `t / n_kv` ranks, as vLLM does. The
//! embedding and LM head are either replicated or split by vocabulary rows.

use std::ops::Range;

use crate::{Error, LlamaConfig, Result};

/// How the embedding table and the LM head are placed across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VocabSharding {
    /// Split by vocabulary rows when the vocabulary divides evenly, else replicate.
    #[default]
    Auto,
    /// Every rank holds the whole table (no collective for the lookup, more memory).
    Replicated,
    /// Every rank holds `vocab / t` rows: masked lookup plus all-reduce, and an all-gather of logits.
    Parallel,
}

impl std::str::FromStr for VocabSharding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "replicated" => Ok(Self::Replicated),
            "parallel" => Ok(Self::Parallel),
            other => Err(format!(
                "unknown vocab sharding {other:?} (auto, replicated, parallel)"
            )),
        }
    }
}

/// The slices of the model that rank `rank` of `world_size` owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub rank: usize,
    pub world_size: usize,
    /// Query heads of this rank (indices into the checkpoint's heads).
    pub q_heads: Range<usize>,
    /// KV heads this rank keeps (a single replicated head when `world_size > n_kv`).
    pub kv_heads: Range<usize>,
    /// Columns of the MLP's intermediate width.
    pub mlp_columns: Range<usize>,
    /// Vocabulary rows of the embedding and LM head; `None` means replicated.
    pub vocab_rows: Option<Range<usize>>,
}

impl ShardLayout {
    /// Computes rank `rank`'s slices, or says why `config` cannot be split `world_size` ways.
    pub fn new(
        config: &LlamaConfig,
        rank: usize,
        world_size: usize,
        vocab: VocabSharding,
    ) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidParallelism { world_size, reason };
        if world_size == 0 || rank >= world_size {
            return Err(invalid(format!("rank {rank} is outside 0..{world_size}")));
        }
        let t = world_size;
        let (n_q, n_kv) = (config.num_attention_heads, config.num_key_value_heads);
        if n_q % t != 0 {
            return Err(invalid(format!(
                "num_attention_heads {n_q} is not divisible by the tensor-parallel size {t}"
            )));
        }
        if n_kv % t != 0 && !t.is_multiple_of(n_kv) {
            return Err(invalid(format!(
                "num_key_value_heads {n_kv} and the tensor-parallel size {t} must divide one another"
            )));
        }
        if !config.intermediate_size.is_multiple_of(t) {
            return Err(invalid(format!(
                "intermediate_size {} is not divisible by the tensor-parallel size {t}",
                config.intermediate_size
            )));
        }
        let q_per_rank = n_q / t;
        let kv_heads = if n_kv >= t {
            let per = n_kv / t;
            rank * per..(rank + 1) * per
        } else {
            // t / n_kv consecutive ranks share one KV head: the head their query heads use.
            let head = rank / (t / n_kv);
            head..head + 1
        };
        let mlp = config.intermediate_size / t;
        let vocab_divides = config.vocab_size.is_multiple_of(t);
        let vocab_rows = match vocab {
            VocabSharding::Replicated => None,
            VocabSharding::Auto if !vocab_divides || t == 1 => None,
            VocabSharding::Parallel if !vocab_divides => {
                return Err(invalid(format!(
                    "vocab_size {} is not divisible by the tensor-parallel size {t}; \
                     use replicated vocab sharding",
                    config.vocab_size
                )))
            }
            VocabSharding::Auto | VocabSharding::Parallel => {
                let per = config.vocab_size / t;
                Some(rank * per..(rank + 1) * per)
            }
        };
        Ok(ShardLayout {
            rank,
            world_size,
            q_heads: rank * q_per_rank..(rank + 1) * q_per_rank,
            kv_heads,
            mlp_columns: rank * mlp..(rank + 1) * mlp,
            vocab_rows,
        })
    }

    /// Checks a configuration against a tensor-parallel size without picking a rank.
    pub fn validate(config: &LlamaConfig, world_size: usize, vocab: VocabSharding) -> Result<()> {
        Self::new(config, 0, world_size, vocab).map(|_| ())
    }

    /// Number of query heads this rank computes.
    pub fn local_q_heads(&self) -> usize {
        self.q_heads.len()
    }

    /// Number of KV heads this rank stores.
    pub fn local_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize) -> LlamaConfig {
        LlamaConfig::from_json(&format!(
            r#"{{"hidden_size": {h}, "intermediate_size": 28672, "num_hidden_layers": 2,
            "num_attention_heads": {heads}, "num_key_value_heads": {kv}, "vocab_size": 32000}}"#,
            h = heads * 128
        ))
        .unwrap()
    }

    #[test]
    fn llama2_70b_at_16_replicates_kv_heads() {
        let c = config(64, 8);
        for rank in 0..16 {
            let l = ShardLayout::new(&c, rank, 16, VocabSharding::Auto).unwrap();
            assert_eq!(l.q_heads, rank * 4..rank * 4 + 4);
            // Query heads 4r..4r+4 belong to KV group (4r)/8 = r/2.
            assert_eq!(l.kv_heads, rank / 2..rank / 2 + 1);
            assert_eq!(l.q_heads.start / (64 / 8), l.kv_heads.start);
            assert_eq!(l.vocab_rows, Some(rank * 2000..(rank + 1) * 2000));
        }
    }

    #[test]
    fn gqa_split_when_enough_kv_heads() {
        let l = ShardLayout::new(&config(64, 8), 3, 8, VocabSharding::Replicated).unwrap();
        assert_eq!(l.q_heads, 24..32);
        assert_eq!(l.kv_heads, 3..4);
        assert_eq!(l.mlp_columns, 3 * 3584..4 * 3584);
        assert_eq!(l.vocab_rows, None);
        let mha = ShardLayout::new(&config(8, 8), 1, 4, VocabSharding::Auto).unwrap();
        assert_eq!(mha.kv_heads, 2..4);
    }

    #[test]
    fn mqa_every_rank_keeps_the_single_head() {
        for rank in 0..4 {
            let l = ShardLayout::new(&config(8, 1), rank, 4, VocabSharding::Auto).unwrap();
            assert_eq!(l.kv_heads, 0..1);
        }
    }

    #[test]
    fn rejects_impossible_layouts_with_a_reason() {
        let err = ShardLayout::validate(&config(8, 8), 3, VocabSharding::Auto).unwrap_err();
        assert!(
            err.to_string()
                .contains("num_attention_heads 8 is not divisible"),
            "{err}"
        );
        let err = ShardLayout::validate(&config(12, 6), 4, VocabSharding::Auto).unwrap_err();
        assert!(err.to_string().contains("must divide one another"), "{err}");
        let mut odd_vocab = config(8, 8);
        odd_vocab.vocab_size = 32001;
        let err = ShardLayout::validate(&odd_vocab, 2, VocabSharding::Parallel).unwrap_err();
        assert!(err.to_string().contains("vocab_size 32001"), "{err}");
        let auto = ShardLayout::new(&odd_vocab, 1, 2, VocabSharding::Auto).unwrap();
        assert_eq!(auto.vocab_rows, None);
        assert!(ShardLayout::new(&config(8, 8), 2, 2, VocabSharding::Auto).is_err());
    }
}
