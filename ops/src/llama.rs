//! The Llama 2 decoder (Touvron et al., arXiv 2307.09288): pre-norm blocks of attention and
//! SwiGLU MLP, each closed by a residual add, then a final RMSNorm and the LM head.
//!
//! Every rank runs this same code on its shard; the two all-reduces per layer live inside the
//! row-parallel projections, so the forward pass reads like the single-device model.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::{
    batch::{LogitsSelection, SequenceStep, StepInputs, StepLimits},
    comm::Communicator,
    kv_cache::KvCache,
    layers::{
        attention::AttentionWeights, mlp::MlpWeights, Attention, LmHead, Mlp, ParallelEmbedding,
        RmsNorm, RotaryEmbedding,
    },
    weights::{Checkpoint, WeightLoader, WeightSpec},
    DType, LlamaConfig, Quantization, Result, ShardLayout, TorchKind,
};

/// The checkpoint names and full shapes of one decoder layer's weights.
pub struct LayerWeights {
    pub input_layernorm: WeightSpec,
    pub attention: AttentionWeights,
    pub post_attention_layernorm: WeightSpec,
    pub mlp: MlpWeights,
}

/// Every weight a Llama 2 checkpoint must hold, named as in Hugging Face checkpoints.
pub struct LlamaWeights {
    pub embed_tokens: WeightSpec,
    pub layers: Vec<LayerWeights>,
    pub norm: WeightSpec,
    /// `lm_head.weight`, or the embedding table when the config ties them.
    pub lm_head: WeightSpec,
}

impl LlamaWeights {
    pub fn new(c: &LlamaConfig) -> Self {
        let h = c.hidden_size;
        let embed_tokens = WeightSpec::new("model.embed_tokens.weight", &[c.vocab_size, h]);
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            WeightSpec::new("lm_head.weight", &[c.vocab_size, h])
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                LayerWeights {
                    input_layernorm: WeightSpec::new(format!("{p}.input_layernorm.weight"), &[h]),
                    attention: AttentionWeights::new(
                        &format!("{p}.self_attn"),
                        h,
                        c.num_attention_heads,
                        c.num_key_value_heads,
                        c.head_dim,
                    ),
                    post_attention_layernorm: WeightSpec::new(
                        format!("{p}.post_attention_layernorm.weight"),
                        &[h],
                    ),
                    mlp: MlpWeights::new(&format!("{p}.mlp"), h, c.intermediate_size),
                }
            })
            .collect();
        LlamaWeights {
            embed_tokens,
            layers,
            norm: WeightSpec::new("model.norm.weight", &[h]),
            lm_head,
        }
    }

    /// Every distinct weight, in load order.
    pub fn all(&self) -> Vec<&WeightSpec> {
        let mut all = vec![&self.embed_tokens];
        for layer in &self.layers {
            all.push(&layer.input_layernorm);
            all.extend(layer.attention.all());
            all.push(&layer.post_attention_layernorm);
            all.extend(layer.mlp.all());
        }
        all.push(&self.norm);
        if self.lm_head != self.embed_tokens {
            all.push(&self.lm_head);
        }
        all
    }

    /// Checks that `checkpoint` holds every weight with the right shape, reading only headers.
    pub fn check(&self, checkpoint: &Checkpoint) -> Result<()> {
        let specs: Vec<WeightSpec> = self.all().into_iter().cloned().collect();
        checkpoint.check(&specs)
    }
}

/// How to place a shard in memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Compute dtype; weights are converted from whatever the checkpoint stores.
    pub dtype: DType,
    pub device: Device,
    /// Draw a progress bar while loading (rank 0 only, usually).
    pub show_progress: bool,
    /// How the products' weights are stored (none: in `dtype`).
    pub quantization: Option<Quantization>,
}

pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        loader: &WeightLoader,
        w: &LayerWeights,
        c: &LlamaConfig,
        layout: &ShardLayout,
        comm: &Arc<Communicator>,
    ) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(loader, &w.input_layernorm, c.rms_norm_eps)?,
            self_attn: Attention::load(loader, &w.attention, layout, c.head_dim, comm.clone())?,
            post_attention_layernorm: RmsNorm::load(
                loader,
                &w.post_attention_layernorm,
                c.rms_norm_eps,
            )?,
            mlp: Mlp::load(loader, &w.mlp, layout.mlp_columns.clone(), comm.clone())?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        step: &StepInputs,
        cache: &mut crate::kv_cache::LayerKv,
    ) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, step, cache)?;
        let x = x.f_add(&attended)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(x.f_add(&mlp)?)
    }
}

/// One rank's shard of a Llama 2 model.
pub struct Llama {
    config: LlamaConfig,
    layout: ShardLayout,
    embed_tokens: ParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: LmHead,
    rotary: RotaryEmbedding,
    kind: Kind,
    device: Device,
}

impl Llama {
    /// Loads `layout`'s shard of `checkpoint`. Checks every weight's presence and shape first,
    /// so a bad checkpoint fails before any data is read.
    pub fn load(
        checkpoint: &Checkpoint,
        config: &LlamaConfig,
        layout: ShardLayout,
        comm: Arc<Communicator>,
        options: LoadOptions,
    ) -> Result<Self> {
        let weights = LlamaWeights::new(config);
        weights.check(checkpoint)?;
        let _no_grad = tch::no_grad_guard();
        let total = weights.all().len();
        let loader = WeightLoader::new(
            checkpoint,
            options.dtype,
            options.device,
            total,
            options.show_progress,
        )
        .with_quantization(options.quantization);
        let started = std::time::Instant::now();
        let embed_tokens = ParallelEmbedding::load(
            &loader,
            &weights.embed_tokens,
            layout.vocab_rows.clone(),
            comm.clone(),
        )?;
        let layers = weights
            .layers
            .iter()
            .map(|w| DecoderLayer::load(&loader, w, config, &layout, &comm))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(&loader, &weights.norm, config.rms_norm_eps)?;
        let lm_head = LmHead::load(&loader, &weights.lm_head, layout.vocab_rows.clone(), comm)?;
        loader.finish();
        let rotary = RotaryEmbedding::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            options.device,
        )?;
        tracing::info!(
            rank = layout.rank,
            world_size = layout.world_size,
            dtype = %options.dtype,
            quantization = options.quantization.map(|q| q.to_string()),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded shard"
        );
        Ok(Llama {
            config: config.clone(),
            layout,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            kind: options.dtype.kind(),
            device: options.device,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes of weights this shard holds (quantized ones at their width).
    /// What computes the shard's weight products, in words: each loop once, in the order the
    /// products first use it (e.g. "AVX-512 BF16", "q4 AVX-512 VNNI, int8 AVX-512 VNNI" with
    /// q4's LM head at 8 bits, "libtorch" on a GPU or with `--cpu-kernels off`).
    pub fn kernels(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        let all = self
            .layers
            .iter()
            .flat_map(|l| l.self_attn.kernels().into_iter().chain(l.mlp.kernels()))
            .chain([self.lm_head.kernel()]);
        for name in all {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.join(", ")
    }

    pub fn weight_bytes(&self) -> usize {
        self.embed_tokens.bytes()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.input_layernorm.bytes()
                        + l.self_attn.bytes()
                        + l.post_attention_layernorm.bytes()
                        + l.mlp.bytes()
                })
                .sum::<usize>()
            + self.norm.bytes()
            + self.lm_head.bytes()
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// An empty KV cache for this shard: `num_blocks` blocks of `block_size` tokens per layer.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        KvCache::new(
            self.config.num_hidden_layers,
            num_blocks,
            block_size,
            self.layout.local_kv_heads(),
            self.config.head_dim,
            self.kind,
            self.device,
        )
    }

    /// Bytes one cached token takes on this rank (keys and values, every layer).
    pub fn cache_bytes_per_token(&self) -> usize {
        2 * self.config.num_hidden_layers
            * self.layout.local_kv_heads()
            * self.config.head_dim
            * self.kind.elt_size_in_bytes()
    }

    /// An upper estimate of one step's transient tensors on this rank, for steps of at most
    /// `tokens` tokens over at most `sequences` sequences of at most `max_len` tokens: what the
    /// device must keep free beside the weights and the KV cache.
    ///
    /// Per layer: the residual stream, its norm, the attention's output and the MLP's, the
    /// queries, keys and values, and the MLP's gate, up and their product (one layer's at a
    /// time); the larger of the decode attention's padded gather of every sequence's keys and
    /// values and a prefill's gather of one context with its KV heads repeated; and f32 logits
    /// over the whole vocabulary for every token (prompt log-probabilities ask for them all),
    /// with the sampler's copy beside them.
    pub fn step_scratch_bytes(&self, tokens: usize, sequences: usize, max_len: usize) -> usize {
        let c = &self.config;
        let q = self.layout.local_q_heads() * c.head_dim;
        let kv = self.layout.local_kv_heads() * c.head_dim;
        let mlp = self.layout.mlp_columns.len();
        let per_token = 4 * c.hidden_size + q + 2 * kv + 3 * mlp;
        let decode_gather = sequences * max_len * kv * 2;
        let prefill_gather = max_len * q * 2;
        let logits = tokens * c.vocab_size * std::mem::size_of::<f32>() * 2;
        (tokens * per_token + decode_gather.max(prefill_gather)) * self.kind.elt_size_in_bytes()
            + logits
    }

    /// Runs one step: appends every sequence's new tokens to the cache and returns f32 logits
    /// `[rows, vocab]` for the rows `selection` picks, identical on every rank.
    pub fn forward(
        &self,
        batch: &[SequenceStep],
        selection: LogitsSelection,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let limits = StepLimits {
            vocab_size: self.config.vocab_size,
            max_positions: self.rotary.max_positions() as usize,
            block_size: cache.block_size(),
            num_blocks: cache.num_blocks(),
        };
        let step = StepInputs::new(
            batch,
            selection,
            &limits,
            &self.rotary,
            self.kind,
            self.device,
        )?;
        let mut x = self.embed_tokens.forward(&step.tokens)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &step, kv)?;
        }
        let x = x.f_index_select(0, &step.logit_rows)?;
        self.lm_head.forward(&self.norm.forward(&x)?)
    }
}
