//! `caravanctl plan`: which tensor-parallel layouts a model can run in on a set of GPU nodes,
//! and what each one buys.
//!
//! For every TP degree `t` that fits the nodes (a divisor of the GPUs per node, or a whole number
//! of nodes), it checks the sharding rules the workers enforce (query heads and MLP width divide
//! by `t`; KV heads divide by `t` or `t` by them, replicating a KV head on `t / n_kv` ranks) and
//! estimates, per GPU:
//! - weight memory, counting exactly the slices a rank loads (vocabulary rows split when the
//!   vocabulary divides by `t`, norms replicated);
//! - KV-cache capacity: `memory × utilisation − weights − activation reserve`, over the KV bytes a
//!   rank stores per token (`2 × layers × kv_heads_per_rank × head_dim × dtype`);
//! - collective traffic: two all-reduces of `hidden × dtype` bytes per token per layer (after
//!   `o_proj` and after `down_proj`), plus, when the vocabulary is split, one all-reduce of the
//!   embedding rows and an all-gather of the logits per step, as the workers run them
//!   (`ops/src/layers/embedding.rs`); a ring sends `2 (t−1)/t` of an all-reduce's payload and
//!   `(t−1)/t` of an all-gather's from every GPU;
//! - decode step time bounds: `max(bytes read / HBM bandwidth, FLOPs / peak) + collectives`,
//!   each costing `latency + ring bytes / link bandwidth` on NVLink or PCIe inside a node, or on
//!   the network when a group spans nodes.
//!
//! The hand calculation these formulas reproduce for Llama-2-70B is in docs/SCALING.md.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use caravan_checkpoint::{self as checkpoint, LlamaConfig, ShardLayout, VocabSharding};
use serde::Serialize;

use super::hardware::{Gpu, Link, NETWORK_ALLREDUCE_LATENCY_US};

/// The shape of a Llama model, as far as memory and traffic go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub q_heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub tie_embeddings: bool,
    pub max_context: u64,
}

impl ModelShape {
    /// Llama 2's published shapes, for `--model llama-2-70b` without a checkpoint at hand.
    pub fn preset(name: &str) -> Option<Self> {
        let (hidden, intermediate, layers, q_heads, kv_heads) = match name {
            "llama-2-7b" => (4096, 11008, 32, 32, 32),
            "llama-2-13b" => (5120, 13824, 40, 40, 40),
            "llama-2-70b" => (8192, 28672, 80, 64, 8),
            _ => return None,
        };
        Some(ModelShape {
            hidden,
            intermediate,
            layers,
            q_heads,
            kv_heads,
            head_dim: hidden / q_heads,
            vocab: 32000,
            tie_embeddings: false,
            max_context: 4096,
        })
    }

    /// A preset name, a `config.json`, or a checkpoint folder holding one (parsed and checked
    /// as the workers do).
    pub fn load(model: &str) -> Result<Self> {
        if let Some(shape) = Self::preset(model) {
            return Ok(shape);
        }
        let path = Path::new(model);
        if !path.exists() {
            bail!(
                "{model:?} is neither a config.json, a checkpoint folder, nor a preset \
                 (llama-2-7b, llama-2-13b, llama-2-70b)"
            );
        }
        Ok(Self::from(&LlamaConfig::from_path(path)?))
    }

    /// The configuration the workers would check a layout against.
    fn config(&self) -> LlamaConfig {
        let size = |v: u64| v as usize;
        LlamaConfig {
            hidden_size: size(self.hidden),
            intermediate_size: size(self.intermediate),
            num_hidden_layers: size(self.layers),
            num_attention_heads: size(self.q_heads),
            num_key_value_heads: size(self.kv_heads),
            head_dim: size(self.head_dim),
            vocab_size: size(self.vocab),
            max_position_embeddings: size(self.max_context),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: self.tie_embeddings,
            dtype: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// Every parameter of the model.
    pub fn parameters(&self) -> u64 {
        self.parameters_per_rank(1)
    }

    /// KV heads a rank of a `tp`-way group stores (one replicated head when `tp > kv_heads`).
    pub fn kv_heads_per_rank(&self, tp: u64) -> u64 {
        (self.kv_heads / tp).max(1)
    }

    /// Whether a `tp`-way group splits the embedding and LM head by vocabulary rows (the
    /// workers' default, `--vocab-sharding auto`: when the vocabulary divides evenly).
    pub fn vocab_parallel(&self, tp: u64) -> bool {
        tp > 1 && self.vocab.is_multiple_of(tp)
    }

    /// Parameters one rank of a `tp`-way group loads.
    pub fn parameters_per_rank(&self, tp: u64) -> u64 {
        let (h, hd) = (self.hidden, self.head_dim);
        let attention = 2 * (self.q_heads / tp) * hd * h + 2 * self.kv_heads_per_rank(tp) * hd * h;
        let mlp = 3 * h * (self.intermediate / tp);
        let norms = 2 * h;
        let vocab_rows = if self.vocab_parallel(tp) {
            self.vocab / tp
        } else {
            self.vocab
        };
        let tables = if self.tie_embeddings { 1 } else { 2 };
        self.layers * (attention + mlp + norms) + tables * vocab_rows * h + h
    }

    /// Why the workers would refuse to split this model `tp` ways, if they would: the same
    /// rules, from the same code ([`ShardLayout`]).
    pub fn sharding_problem(&self, tp: u64) -> Option<String> {
        match ShardLayout::validate(&self.config(), tp as usize, VocabSharding::Auto) {
            Ok(()) => None,
            Err(checkpoint::Error::InvalidParallelism { reason, .. }) => Some(reason),
            Err(other) => Some(other.to_string()),
        }
    }
}

impl From<&LlamaConfig> for ModelShape {
    fn from(c: &LlamaConfig) -> Self {
        let size = |v: usize| v as u64;
        ModelShape {
            hidden: size(c.hidden_size),
            intermediate: size(c.intermediate_size),
            layers: size(c.num_hidden_layers),
            q_heads: size(c.num_attention_heads),
            kv_heads: size(c.num_key_value_heads),
            head_dim: size(c.head_dim),
            vocab: size(c.vocab_size),
            tie_embeddings: c.tie_word_embeddings,
            max_context: size(c.max_position_embeddings),
        }
    }
}

/// What the layout is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// The most decode tokens per second across the cluster, at full KV cache.
    Throughput,
    /// The shortest time per output token for a single stream.
    Latency,
}

/// The cluster and the assumptions to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelShape,
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub gpu: &'static Gpu,
    /// Bytes per weight and per KV element (2 for bf16/f16, 4 for f32).
    pub dtype_bytes: u64,
    /// Sequence length the capacity is counted in.
    pub context: u64,
    /// Network bandwidth of a node, Gbit/s, for groups that span nodes.
    pub network_gbps: f64,
    /// Fraction of GPU memory Caravan may use (vLLM's default is 0.9).
    pub memory_utilization: f64,
    /// Memory kept for activations and the CUDA context, per GPU.
    pub activation_reserve_bytes: u64,
    pub goal: Goal,
}

/// One TP layout: `tp`-way groups, `replicas` of them.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub tp: u64,
    pub replicas: u64,
    /// Nodes one group spans (1 when it stays inside a node).
    pub nodes_per_group: u64,
    /// What the all-reduces travel over.
    pub link: String,
    /// Why this layout cannot run, if it cannot (sharding rules or memory).
    pub problem: Option<String>,
    /// The figures, when the sharding rules allow the layout (even if memory does not).
    pub estimate: Option<Estimate>,
}

/// Per-layout figures. Bytes are exact counts; times are lower bounds from bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub weight_bytes_per_gpu: u64,
    pub usable_bytes_per_gpu: u64,
    pub kv_cache_bytes_per_gpu: u64,
    pub kv_bytes_per_token_per_gpu: u64,
    /// Tokens of KV cache one group holds (each rank holds its heads of every token).
    pub kv_cache_tokens: u64,
    /// Sequences of `context` tokens one group holds at once.
    pub sequences_per_group: u64,
    /// Payload of the two all-reduces of one token in one layer (0 without tensor parallelism).
    pub allreduce_bytes_per_token_per_layer: u64,
    /// All-reduce payload of one token over a whole decode step: every layer's, plus the
    /// embedding's when the vocabulary is split.
    pub allreduce_bytes_per_token: u64,
    /// All-reduces in one decode step: `2 × layers`, plus one for a split embedding.
    pub allreduces_per_step: u64,
    /// All-gathered logits of one token per step (`vocab × dtype` when the vocabulary is split).
    pub allgather_bytes_per_token: u64,
    /// Bytes each GPU sends per token per step in ring collectives: `2 (t−1)/t` of the
    /// all-reduce payload plus `(t−1)/t` of the all-gather's.
    pub ring_bytes_sent_per_gpu_per_token: u64,
    /// Time one decode step spends in collectives at batch 1.
    pub collectives_ms_per_token: f64,
    /// Time per output token at batch 1 and a short context.
    pub decode_ms_per_token: f64,
    /// Time per output token at batch 1 with a full `context` of KV to read.
    pub decode_ms_per_token_full_context: f64,
    /// Decode tokens per second of the whole cluster with every group full.
    pub cluster_tokens_per_s: f64,
}

/// Every layout, and the one to use.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model_parameters: u64,
    pub model_bytes: u64,
    pub gpu: String,
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub context: u64,
    pub goal: Goal,
    pub layouts: Vec<Layout>,
    /// Index into `layouts`.
    pub recommended: Option<usize>,
    pub reason: String,
}

impl PlanRequest {
    fn check(&self) -> Result<()> {
        ensure!(self.nodes >= 1, "--nodes must be at least 1");
        ensure!(
            self.gpus_per_node >= 1,
            "--gpus-per-node must be at least 1"
        );
        ensure!(self.context >= 1, "--context must be at least 1");
        ensure!(
            self.context <= self.model.max_context,
            "--context {} exceeds the model's context of {} tokens",
            self.context,
            self.model.max_context
        );
        ensure!(
            self.memory_utilization > 0.0 && self.memory_utilization <= 1.0,
            "--memory-utilization must be in (0, 1]"
        );
        ensure!(self.network_gbps > 0.0, "--network-gbps must be positive");
        Ok(())
    }

    /// The link a `tp`-way group's all-reduces run over.
    fn link(&self, tp: u64) -> Link {
        if tp <= self.gpus_per_node {
            self.gpu.link
        } else {
            Link {
                name: "network",
                gbytes_per_s: self.network_gbps / 8.0,
                allreduce_latency_us: NETWORK_ALLREDUCE_LATENCY_US,
            }
        }
    }

    /// Seconds of one decode step of `batch` sequences each with `context` tokens of KV.
    fn step_seconds(&self, tp: u64, batch: u64, context: u64) -> f64 {
        let m = &self.model;
        let weights = (m.parameters_per_rank(tp) * self.dtype_bytes) as f64;
        let kv_per_token = self.kv_bytes_per_token(tp) as f64;
        let memory =
            (weights + (batch * context) as f64 * kv_per_token) / (self.gpu.hbm_gbytes_per_s * 1e9);
        let tflops = if self.dtype_bytes >= 4 {
            self.gpu.tflops_16bit / 2.0
        } else {
            self.gpu.tflops_16bit
        };
        let compute = 2.0 * m.parameters_per_rank(tp) as f64 * batch as f64 / (tflops * 1e12);
        memory.max(compute) + self.collective_seconds(tp, batch)
    }

    /// All-reduces in one decode step of a `tp`-way group.
    fn allreduces_per_step(&self, tp: u64) -> u64 {
        match tp {
            1 => 0,
            _ => 2 * self.model.layers + u64::from(self.model.vocab_parallel(tp)),
        }
    }

    /// Seconds of the collectives of one decode step of `batch` sequences: the all-reduces of
    /// `batch × hidden` values, and the all-gather of `batch × vocab` logits when the vocabulary
    /// is split.
    fn collective_seconds(&self, tp: u64, batch: u64) -> f64 {
        if tp == 1 {
            return 0.0;
        }
        let link = self.link(tp);
        let (alpha, beta) = (link.allreduce_latency_us * 1e-6, link.gbytes_per_s * 1e9);
        let share = (tp - 1) as f64 / tp as f64;
        let m = &self.model;
        let allreduce_bytes = (batch * m.hidden * self.dtype_bytes) as f64;
        let allreduce = alpha + 2.0 * share * allreduce_bytes / beta;
        let allgather = if m.vocab_parallel(tp) {
            alpha + share * (batch * m.vocab * self.dtype_bytes) as f64 / beta
        } else {
            0.0
        };
        self.allreduces_per_step(tp) as f64 * allreduce + allgather
    }

    fn kv_bytes_per_token(&self, tp: u64) -> u64 {
        let m = &self.model;
        2 * m.layers * m.kv_heads_per_rank(tp) * m.head_dim * self.dtype_bytes
    }

    fn estimate(&self, tp: u64) -> (Estimate, Option<String>) {
        let m = &self.model;
        let weights = m.parameters_per_rank(tp) * self.dtype_bytes;
        let usable = (self.gpu.memory_bytes() as f64 * self.memory_utilization) as u64;
        let kv_cache = usable.saturating_sub(weights + self.activation_reserve_bytes);
        let kv_per_token = self.kv_bytes_per_token(tp);
        let tokens = kv_cache / kv_per_token;
        let sequences = tokens / self.context;
        let replicas = self.nodes * self.gpus_per_node / tp;
        let per_layer = if tp == 1 {
            0
        } else {
            2 * m.hidden * self.dtype_bytes
        };
        let allreduces = self.allreduces_per_step(tp);
        let allreduce_bytes = allreduces * m.hidden * self.dtype_bytes;
        let allgather_bytes = if m.vocab_parallel(tp) {
            m.vocab * self.dtype_bytes
        } else {
            0
        };
        let ring_sent = (2 * allreduce_bytes + allgather_bytes) * (tp - 1) / tp;
        let throughput = if sequences == 0 {
            0.0
        } else {
            replicas as f64 * sequences as f64 / self.step_seconds(tp, sequences, self.context)
        };
        let problem = if weights + self.activation_reserve_bytes > usable {
            Some(format!(
                "does not fit: {:.1} GiB of weights and {:.1} GiB of activation reserve per GPU \
                 exceed the {:.1} GiB usable",
                gib(weights),
                gib(self.activation_reserve_bytes),
                gib(usable)
            ))
        } else if sequences == 0 {
            Some(format!(
                "KV cache of {tokens} tokens per group cannot hold one {}-token sequence",
                self.context
            ))
        } else {
            None
        };
        let estimate = Estimate {
            weight_bytes_per_gpu: weights,
            usable_bytes_per_gpu: usable,
            kv_cache_bytes_per_gpu: kv_cache,
            kv_bytes_per_token_per_gpu: kv_per_token,
            kv_cache_tokens: tokens,
            sequences_per_group: sequences,
            allreduce_bytes_per_token_per_layer: per_layer,
            allreduce_bytes_per_token: allreduce_bytes,
            allreduces_per_step: allreduces,
            allgather_bytes_per_token: allgather_bytes,
            ring_bytes_sent_per_gpu_per_token: ring_sent,
            collectives_ms_per_token: self.collective_seconds(tp, 1) * 1e3,
            decode_ms_per_token: self.step_seconds(tp, 1, 0) * 1e3,
            decode_ms_per_token_full_context: self.step_seconds(tp, 1, self.context) * 1e3,
            cluster_tokens_per_s: throughput,
        };
        (estimate, problem)
    }

    /// Every TP degree that tiles the nodes: divisors of the GPUs per node, then whole numbers
    /// of nodes that divide the node count.
    fn tp_degrees(&self) -> Vec<u64> {
        let n = self.gpus_per_node;
        let mut degrees: Vec<u64> = (1..=n).filter(|t| n.is_multiple_of(*t)).collect();
        degrees.extend(
            (2..=self.nodes)
                .filter(|k| self.nodes.is_multiple_of(*k))
                .map(|k| k * n),
        );
        degrees
    }

    /// Plans every layout and picks one.
    pub fn plan(&self) -> Result<Plan> {
        self.check()?;
        let mut layouts = Vec::new();
        for tp in self.tp_degrees() {
            let link = self.link(tp);
            let mut layout = Layout {
                tp,
                replicas: self.nodes * self.gpus_per_node / tp,
                nodes_per_group: tp.div_ceil(self.gpus_per_node),
                link: if tp == 1 {
                    "none".into()
                } else {
                    link.name.into()
                },
                problem: self.model.sharding_problem(tp),
                estimate: None,
            };
            if layout.problem.is_none() {
                let (estimate, problem) = self.estimate(tp);
                layout.estimate = Some(estimate);
                layout.problem = problem;
            }
            layouts.push(layout);
        }
        let (recommended, reason) = self.recommend(&layouts);
        let parameters = self.model.parameters();
        Ok(Plan {
            model_parameters: parameters,
            model_bytes: parameters * self.dtype_bytes,
            gpu: self.gpu.name.into(),
            nodes: self.nodes,
            gpus_per_node: self.gpus_per_node,
            context: self.context,
            goal: self.goal,
            layouts,
            recommended,
            reason,
        })
    }

    fn recommend(&self, layouts: &[Layout]) -> (Option<usize>, String) {
        let candidates =
            layouts
                .iter()
                .enumerate()
                .filter_map(|(i, l)| match (&l.problem, &l.estimate) {
                    (None, Some(e)) => Some((i, l, e)),
                    _ => None,
                });
        let best = match self.goal {
            Goal::Throughput => candidates.max_by(|a, b| {
                a.2.cluster_tokens_per_s
                    .total_cmp(&b.2.cluster_tokens_per_s)
                    // Equal throughput: fewer GPUs per group (fewer collectives to go wrong).
                    .then(b.1.tp.cmp(&a.1.tp))
            }),
            Goal::Latency => candidates.min_by(|a, b| {
                a.2.decode_ms_per_token
                    .total_cmp(&b.2.decode_ms_per_token)
                    .then(a.1.tp.cmp(&b.1.tp))
            }),
        };
        let Some((index, layout, e)) = best else {
            let why: Vec<String> = layouts
                .iter()
                .map(|l| format!("TP {}: {}", l.tp, l.problem.as_deref().unwrap_or("?")))
                .collect();
            return (
                None,
                format!(
                    "no layout fits {} node(s) x {} {} ({}); the model has {:.1} GiB of weights",
                    self.nodes,
                    self.gpus_per_node,
                    self.gpu.name,
                    why.join("; "),
                    gib(self.model.parameters() * self.dtype_bytes),
                ),
            );
        };
        let placement = if layout.nodes_per_group == 1 {
            if layout.tp == 1 {
                "each replica on one GPU, no collectives".to_string()
            } else {
                format!("each group inside one node on {}", layout.link)
            }
        } else {
            format!(
                "each group spans {} nodes over the network",
                layout.nodes_per_group
            )
        };
        let why = match self.goal {
            Goal::Throughput => format!(
                "the highest estimated decode throughput, {:.0} tokens/s across the cluster with \
                 {} concurrent {}-token sequences per group",
                e.cluster_tokens_per_s, e.sequences_per_group, self.context
            ),
            Goal::Latency => format!(
                "the shortest time per output token, {:.1} ms at batch 1",
                e.decode_ms_per_token
            ),
        };
        (
            Some(index),
            format!(
                "TP={} x {} replica{}: {why}; {placement}",
                layout.tp,
                layout.replicas,
                if layout.replicas == 1 { "" } else { "s" }
            ),
        )
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The plan as an operator reads it: one row per layout, then the recommendation.
pub fn render(plan: &Plan) -> String {
    let mut out = format!(
        "{} parameters ({:.1} GiB) on {} node(s) x {} {}, context {}\n\n",
        plan.model_parameters,
        gib(plan.model_bytes),
        plan.nodes,
        plan.gpus_per_node,
        plan.gpu,
        plan.context
    );
    out.push_str(&format!(
        "{:>4} {:>8} {:>6} {:>13} {:>13} {:>10} {:>9} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}  {}\n",
        "TP",
        "replicas",
        "nodes",
        "weights/GPU",
        "KV/GPU",
        "KV tokens",
        "seqs",
        "AR/layer",
        "AR/step",
        "sent/GPU",
        "ms/token",
        "ms/tok@ctx",
        "tokens/s",
        "link / problem"
    ));
    for (i, l) in plan.layouts.iter().enumerate() {
        let mark = if Some(i) == plan.recommended {
            "*"
        } else {
            " "
        };
        let note = l.problem.clone().unwrap_or_else(|| l.link.clone());
        match &l.estimate {
            Some(e) => out.push_str(&format!(
                "{mark}{:>3} {:>8} {:>6} {:>9.1} GiB {:>9.1} GiB {:>10} {:>9} {:>6.0} KiB {:>6.0} KiB {:>6.0} KiB {:>12.2} {:>12.2} {:>12.0}  {note}\n",
                l.tp,
                l.replicas,
                l.nodes_per_group,
                gib(e.weight_bytes_per_gpu),
                gib(e.kv_cache_bytes_per_gpu),
                e.kv_cache_tokens,
                e.sequences_per_group,
                e.allreduce_bytes_per_token_per_layer as f64 / 1024.0,
                e.allreduce_bytes_per_token as f64 / 1024.0,
                e.ring_bytes_sent_per_gpu_per_token as f64 / 1024.0,
                e.decode_ms_per_token,
                e.decode_ms_per_token_full_context,
                e.cluster_tokens_per_s,
            )),
            None => out.push_str(&format!(
                "{mark}{:>3} {:>8} {:>6} {:>13} {:>13} {:>10} {:>9} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}  {note}\n",
                l.tp, l.replicas, l.nodes_per_group, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"
            )),
        }
    }
    out.push_str(&format!(
        "\nrecommended: {}\n(AR: all-reduce payload per token, in one layer and in a whole decode step; \
         sent/GPU: ring traffic per GPU per token, logits all-gather included. Times are lower \
         bounds from memory bandwidth, peak FLOP/s and link figures; tokens/s assumes every \
         sequence at full context)\n",
        plan.reason
    ));
    out
}

#[cfg(test)]
mod tests {
    //! The expected values are the hand calculation in docs/SCALING.md, written out here as
    //! arithmetic on Llama-2-70B's published shape rather than taken from the planner.
    use super::*;
    use crate::operator::hardware;

    const GIB: u64 = 1 << 30;

    fn request(nodes: u64, gpus_per_node: u64) -> PlanRequest {
        PlanRequest {
            model: ModelShape::preset("llama-2-70b").unwrap(),
            nodes,
            gpus_per_node,
            gpu: hardware::gpu("a100-80gb").unwrap(),
            dtype_bytes: 2,
            context: 4096,
            network_gbps: 200.0,
            memory_utilization: 0.9,
            activation_reserve_bytes: 2 * GIB,
            goal: Goal::Throughput,
        }
    }

    fn layout(plan: &Plan, tp: u64) -> &Layout {
        plan.layouts.iter().find(|l| l.tp == tp).unwrap()
    }

    #[test]
    fn llama_2_70b_has_69_billion_parameters() {
        // Per layer: q and o 8192x8192 each, k and v 1024x8192 each, three MLP matrices
        // 8192x28672, two norms; plus embedding and LM head 32000x8192 and the final norm.
        let per_layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192;
        let total = 80 * per_layer + 2 * 32000 * 8192 + 8192;
        assert_eq!(total, 68_976_648_192);
        assert_eq!(
            ModelShape::preset("llama-2-70b").unwrap().parameters(),
            total
        );
    }

    #[test]
    fn eight_a100_80gb_in_one_node() {
        let plan = request(1, 8).plan().unwrap();
        let tps: Vec<u64> = plan.layouts.iter().map(|l| l.tp).collect();
        assert_eq!(tps, vec![1, 2, 4, 8]);

        // TP 1: 128.5 GiB of weights cannot fit 80 GiB.
        let one = layout(&plan, 1);
        assert!(one.problem.as_deref().unwrap().contains("does not fit"));

        // TP 8: a rank holds 8 query heads, 1 KV head, 3584 MLP columns, 4000 vocab rows.
        let e = layout(&plan, 8).estimate.as_ref().unwrap();
        let params = 80 * (2 * 8 * 128 * 8192 + 2 * 128 * 8192 + 3 * 8192 * 3584 + 2 * 8192)
            + 2 * 4000 * 8192
            + 8192;
        assert_eq!(e.weight_bytes_per_gpu, 2 * params);
        assert_eq!(e.weight_bytes_per_gpu, 17_246_470_144);
        // KV per token per GPU: K and V, 80 layers, 1 head of 128, 2 bytes = 40 KiB.
        assert_eq!(e.kv_bytes_per_token_per_gpu, 40 * 1024);
        // 0.9 x 80 GiB = 72 GiB usable; minus weights and 2 GiB reserve.
        let usable = 72 * GIB - 17_246_470_144 - 2 * GIB;
        assert_eq!(e.kv_cache_tokens, usable / (40 * 1024));
        assert_eq!(e.kv_cache_tokens, 1_413_951);
        assert_eq!(e.sequences_per_group, 345);
        // Two all-reduces of 8192 bf16 values per layer: 32 KiB. A step: 80 layers' 160 plus
        // the split embedding's one, 161 x 16 KiB; and the all-gather of 32000 bf16 logits.
        assert_eq!(e.allreduce_bytes_per_token_per_layer, 32 * 1024);
        assert_eq!(e.allreduces_per_step, 161);
        assert_eq!(e.allreduce_bytes_per_token, 161 * 16 * 1024);
        assert_eq!(e.allreduce_bytes_per_token, 2_637_824);
        assert_eq!(e.allgather_bytes_per_token, 64_000);
        // A ring of 8: each GPU sends 2 x 7/8 of the all-reduce payload and 7/8 of the logits.
        assert_eq!(
            e.ring_bytes_sent_per_gpu_per_token,
            (2 * 2_637_824 + 64_000) * 7 / 8
        );
        // Batch 1: 17.25 GB at 2039 GB/s = 8.46 ms, plus 161 all-reduces of 25 us + 7/4 x 16 KiB
        // at 300 GB/s and one all-gather of 25 us + 7/8 x 64 kB: 4.07 ms.
        let expected_ms = 17_246_470_144.0 / 2039e9 * 1e3
            + 161.0 * (25e-3 + 2.0 * 7.0 / 8.0 * 16384.0 / 300e9 * 1e3)
            + (25e-3 + 7.0 / 8.0 * 64000.0 / 300e9 * 1e3);
        assert!((e.decode_ms_per_token - expected_ms).abs() < 1e-9);
        assert!(
            (e.decode_ms_per_token - 12.52).abs() < 0.01,
            "{}",
            e.decode_ms_per_token
        );

        // TP 2: 64.2 GiB of weights leaves room for only 9 full sequences.
        let e2 = layout(&plan, 2).estimate.as_ref().unwrap();
        assert_eq!(e2.kv_bytes_per_token_per_gpu, 160 * 1024);
        assert_eq!(e2.kv_cache_tokens, 37_743);
        assert_eq!(e2.sequences_per_group, 9);
        // TP 4: 121 sequences per group.
        assert_eq!(
            layout(&plan, 4)
                .estimate
                .as_ref()
                .unwrap()
                .sequences_per_group,
            121
        );

        // In one node all-reduces are cheap on NVLink, so the whole node as one group wins.
        let best = &plan.layouts[plan.recommended.unwrap()];
        assert_eq!((best.tp, best.replicas), (8, 1), "{}", plan.reason);
    }

    #[test]
    fn two_nodes_of_four_a100_80gb_keep_groups_inside_nodes() {
        let plan = request(2, 4).plan().unwrap();
        let tps: Vec<u64> = plan.layouts.iter().map(|l| l.tp).collect();
        assert_eq!(tps, vec![1, 2, 4, 8]);
        let across = layout(&plan, 8);
        assert_eq!(
            (across.nodes_per_group, across.link.as_str()),
            (2, "network")
        );
        let e = across.estimate.as_ref().unwrap();
        // 200 Gbit/s = 25 GB/s; at batch 1, 161 x (50 us + 7/4 x 16 KiB / 25 GB/s) plus the
        // logits' 50 us + 7/8 x 64 kB / 25 GB/s = 8.29 ms.
        let expected_ms = 161.0 * (50e-3 + 2.0 * 7.0 / 8.0 * 16384.0 / 25e9 * 1e3)
            + (50e-3 + 7.0 / 8.0 * 64000.0 / 25e9 * 1e3);
        assert!((e.collectives_ms_per_token - expected_ms).abs() < 1e-9);
        assert!((e.collectives_ms_per_token - 8.29).abs() < 0.01);
        // At 345 sequences the network all-reduces dominate the step, so two TP-4 groups on
        // NVLink out-serve one TP-8 group across the network.
        let best = &plan.layouts[plan.recommended.unwrap()];
        assert_eq!((best.tp, best.replicas), (4, 2), "{}", plan.reason);
        assert!(plan.reason.contains("inside one node"), "{}", plan.reason);

        let mut latency = request(2, 4);
        latency.goal = Goal::Latency;
        let plan = latency.plan().unwrap();
        let best = &plan.layouts[plan.recommended.unwrap()];
        // At batch 1 the network's latency costs less than reading twice the weights: TP 8
        // across nodes (8.5 ms + 8.3 ms) beats TP 4 on NVLink (16.9 ms + 4.1 ms).
        assert_eq!(best.tp, 8, "{}", plan.reason);
        assert!(plan.reason.contains("spans 2 nodes"), "{}", plan.reason);
    }

    #[test]
    fn impossible_layouts_say_why() {
        // 3 GPUs per node: 64 heads do not divide by 3.
        let plan = request(1, 3).plan().unwrap();
        let three = layout(&plan, 3);
        assert!(three
            .problem
            .as_deref()
            .unwrap()
            .contains("num_attention_heads 64 is not divisible"));
        assert!(three.estimate.is_none());
        // Llama-2-70B on two A10s fits nowhere.
        let mut small = request(1, 2);
        small.gpu = hardware::gpu("a10-24gb").unwrap();
        let plan = small.plan().unwrap();
        assert!(plan.recommended.is_none());
        assert!(plan.reason.starts_with("no layout fits"), "{}", plan.reason);
        assert!(
            plan.reason.contains("TP 2: does not fit"),
            "{}",
            plan.reason
        );
        // One node of 3 GPUs: TP 1 is short of memory and TP 3 breaks the heads, and the
        // reason names both rather than blaming memory alone.
        let plan = request(1, 3).plan().unwrap();
        assert!(plan.recommended.is_none());
        assert!(
            plan.reason.contains("TP 1: does not fit")
                && plan.reason.contains(
                    "TP 3: num_attention_heads 64 is not divisible by the tensor-parallel size 3"
                ),
            "{}",
            plan.reason
        );
        // 6 KV heads and TP 4: neither divides the other.
        let mut odd = request(1, 4);
        odd.model.q_heads = 48;
        odd.model.kv_heads = 6;
        let plan = odd.plan().unwrap();
        assert!(layout(&plan, 4)
            .problem
            .as_deref()
            .unwrap()
            .contains("must divide one another"));
        // A context longer than the model's is refused outright.
        let mut long = request(1, 8);
        long.context = 8192;
        assert!(long.plan().unwrap_err().to_string().contains("exceeds"));
    }

    #[test]
    fn more_ranks_than_kv_heads_replicate_one_head_per_rank() {
        let model = ModelShape::preset("llama-2-70b").unwrap();
        assert_eq!(model.kv_heads_per_rank(4), 2);
        assert_eq!(model.kv_heads_per_rank(16), 1);
        assert!(model.sharding_problem(16).is_none());
        assert!(model.sharding_problem(3).is_some());
    }
}
