//! Live counters and gauges of the scheduler, read by `GET /metrics` (Prometheus text format).

use std::sync::atomic::{AtomicU64, Ordering};

/// Written by the scheduler task, read by HTTP handlers.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests accepted and not yet ended (completed, failed or cancelled).
    pub in_flight: AtomicU64,
    /// Requests accepted but not yet admitted to the running batch.
    pub waiting: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Blocks referenced by a sequence.
    pub kv_blocks_used: AtomicU64,
    /// Unreferenced blocks still holding a reusable prefix.
    pub kv_blocks_cached: AtomicU64,
    pub block_size: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_cache_queried_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Sequences evicted from the batch for lack of KV blocks (recomputed later).
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens the workers computed (prefill chunks plus decodes), over all steps.
    pub step_tokens: AtomicU64,
    pub requests_rejected_queue_full: AtomicU64,
    /// Wall time of steps as the coordinator sees them (plan sent to answers back).
    pub step_micros: AtomicU64,
    /// Rank 0's time inside those steps (forward, collectives, sampling).
    pub worker_compute_micros: AtomicU64,
}

impl EngineStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn set(gauge: &AtomicU64, value: usize) {
        gauge.store(value as u64, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, value: usize) {
        counter.fetch_add(value as u64, Ordering::Relaxed);
    }

    pub fn sub(gauge: &AtomicU64, value: usize) {
        gauge.fetch_sub(value as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every value.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 15] = [
            (
                "caravan_requests_in_flight",
                "gauge",
                "Requests accepted and not yet ended.",
                &self.in_flight,
            ),
            (
                "caravan_requests_waiting",
                "gauge",
                "Requests queued for a batch slot.",
                &self.waiting,
            ),
            (
                "caravan_requests_running",
                "gauge",
                "Sequences in the running batch.",
                &self.running,
            ),
            (
                "caravan_kv_cache_blocks_total",
                "gauge",
                "KV-cache blocks in the pool.",
                &self.kv_blocks_total,
            ),
            (
                "caravan_kv_cache_blocks_used",
                "gauge",
                "KV-cache blocks referenced by a sequence.",
                &self.kv_blocks_used,
            ),
            (
                "caravan_kv_cache_blocks_cached",
                "gauge",
                "Unreferenced KV-cache blocks kept for prefix reuse.",
                &self.kv_blocks_cached,
            ),
            (
                "caravan_kv_cache_block_size_tokens",
                "gauge",
                "Tokens per KV-cache block.",
                &self.block_size,
            ),
            (
                "caravan_prefix_cache_queried_tokens_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                &self.prefix_cache_queried_tokens,
            ),
            (
                "caravan_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens found in the prefix cache (not recomputed).",
                &self.prefix_cache_hit_tokens,
            ),
            (
                "caravan_preemptions_total",
                "counter",
                "Sequences preempted for lack of KV-cache blocks.",
                &self.preemptions,
            ),
            (
                "caravan_prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                &self.prompt_tokens,
            ),
            (
                "caravan_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generation_tokens,
            ),
            (
                "caravan_steps_total",
                "counter",
                "Steps run on the worker group.",
                &self.steps,
            ),
            (
                "caravan_step_tokens_total",
                "counter",
                "Tokens computed by the worker group (prefill and decode).",
                &self.step_tokens,
            ),
            (
                "caravan_requests_rejected_total",
                "counter",
                "Requests refused with 429 because the queue was full.",
                &self.requests_rejected_queue_full,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out += &format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                Self::get(value)
            );
        }
        for (name, help, value) in [
            (
                "caravan_step_seconds_total",
                "Wall time of steps, plan sent to answers back.",
                &self.step_micros,
            ),
            (
                "caravan_worker_compute_seconds_total",
                "Rank 0's compute time inside steps (forward, collectives, sampling).",
                &self.worker_compute_micros,
            ),
        ] {
            let seconds = Self::get(value) as f64 / 1e6;
            out += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {seconds}\n");
        }
        out
    }
}
