//! Live counters, gauges and histograms of the scheduler, read by `GET /metrics` (Prometheus text
//! format).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::executor::StepErrorKind;

/// Upper bounds of latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A Prometheus histogram of durations (made cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str) -> String {
        let mut out = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            out += &format!("{name}_bucket{{le=\"{le}\"}} {cumulative}\n");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        out += &format!("{name}_sum {sum}\n{name}_count {cumulative}\n");
        out
    }
}

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
    /// Steps planned and sent before the answer of the step before them (async scheduling).
    pub steps_planned_ahead: AtomicU64,
    /// Tokens the workers computed (prefill chunks plus decodes), over all steps.
    pub step_tokens: AtomicU64,
    /// Wall time of steps as the coordinator sees them (plan sent to answers back).
    pub step_micros: AtomicU64,
    /// Rank 0's time inside those steps (forward, collectives, sampling).
    pub worker_compute_micros: AtomicU64,
    /// Of which inside collectives.
    pub collective_micros: AtomicU64,
    /// Step wall time less rank 0's compute: the plan's way to the ranks and the answers' back
    /// (gRPC, the workers' handlers, waiting for the slowest rank).
    pub outside_worker_micros: AtomicU64,
    /// The coordinator's time computing structured-output token masks for the steps.
    pub mask_micros: AtomicU64,
    /// Requests ended, by how.
    pub requests_stopped: AtomicU64,
    pub requests_length: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_rejected_queue_full: AtomicU64,
    /// Failed steps, by kind (timeout, unreachable, rejected, diverged).
    pub step_failures_timeout: AtomicU64,
    pub step_failures_unreachable: AtomicU64,
    pub step_failures_rejected: AtomicU64,
    pub step_failures_diverged: AtomicU64,
    /// Worker groups formed (loaded and warmed up), the first one included.
    pub group_formations: AtomicU64,
    /// Sequences that were running when their group failed and were recomputed on the next.
    pub requests_resumed: AtomicU64,
    /// A group's failure to the next group taking over its requests.
    pub recovery: Histogram,
    /// Arrival at the scheduler to the first token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
    /// Arrival to the last token, for requests that completed.
    pub end_to_end_latency: Histogram,
}

impl EngineStats {
    /// The failure counter of `kind`.
    pub fn step_failures(&self, kind: StepErrorKind) -> &AtomicU64 {
        match kind {
            StepErrorKind::Timeout => &self.step_failures_timeout,
            StepErrorKind::Unreachable => &self.step_failures_unreachable,
            StepErrorKind::Rejected => &self.step_failures_rejected,
            StepErrorKind::Diverged => &self.step_failures_diverged,
        }
    }

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
        let plain: [(&str, &str, &str, &AtomicU64); 17] = [
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
                "caravan_steps_planned_ahead_total",
                "counter",
                "Steps planned and sent while the step before them ran (asynchronous scheduling).",
                &self.steps_planned_ahead,
            ),
            (
                "caravan_step_tokens_total",
                "counter",
                "Tokens computed by the worker group (prefill and decode).",
                &self.step_tokens,
            ),
            (
                "caravan_group_formations_total",
                "counter",
                "Worker groups formed (shards loaded, warmed up), the first one included.",
                &self.group_formations,
            ),
            (
                "caravan_requests_resumed_total",
                "counter",
                "Sequences running when their worker group failed, recomputed on the group formed next.",
                &self.requests_resumed,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in plain {
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
            (
                "caravan_collective_seconds_total",
                "Rank 0's time inside collectives (TCP ring).",
                &self.collective_micros,
            ),
            (
                "caravan_step_outside_worker_seconds_total",
                "Step wall time outside rank 0's compute (gRPC both ways, handlers, the slowest rank); per step: divide by caravan_steps_total.",
                &self.outside_worker_micros,
            ),
            (
                "caravan_structured_output_mask_seconds_total",
                "The coordinator's time computing structured-output token masks before steps (not part of the steps' wall time).",
                &self.mask_micros,
            ),
        ] {
            let seconds = Self::get(value) as f64 / 1e6;
            out += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {seconds}\n");
        }
        out += "# HELP caravan_requests_total Requests ended, by status.\n# TYPE caravan_requests_total counter\n";
        for (status, value) in [
            ("stop", &self.requests_stopped),
            ("length", &self.requests_length),
            ("error", &self.requests_failed),
            ("cancelled", &self.requests_cancelled),
            ("rejected", &self.requests_rejected_queue_full),
        ] {
            out += &format!(
                "caravan_requests_total{{status=\"{status}\"}} {}\n",
                Self::get(value)
            );
        }
        out += "# HELP caravan_step_failures_total Failed steps, by kind.\n# TYPE caravan_step_failures_total counter\n";
        for (kind, value) in [
            ("timeout", &self.step_failures_timeout),
            ("unreachable", &self.step_failures_unreachable),
            ("rejected", &self.step_failures_rejected),
            ("diverged", &self.step_failures_diverged),
        ] {
            out += &format!(
                "caravan_step_failures_total{{kind=\"{kind}\"}} {}\n",
                Self::get(value)
            );
        }
        out += &self.time_to_first_token.render(
            "caravan_time_to_first_token_seconds",
            "Arrival at the scheduler to the first generated token.",
        );
        out += &self.inter_token_latency.render(
            "caravan_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
        );
        out += &self.end_to_end_latency.render(
            "caravan_request_latency_seconds",
            "Arrival at the scheduler to the last token, for completed requests.",
        );
        out += &self.recovery.render(
            "caravan_recovery_seconds",
            "A worker group's failure to the next group taking over the requests in flight.",
        );
        out
    }
}
