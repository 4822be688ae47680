//! The scheduling policy, with no I/O: which sequences run in the next step, with how many tokens,
//! in which KV-cache blocks (iteration-level scheduling, as in Orca and vLLM v1's scheduler).
//!
//! [`Scheduler::schedule`] turns the waiting and running sequences into a [`StepPlan`] under a
//! token budget. Running sequences that decode take one token each first; then sequences still
//! prefilling, then newly admitted ones, take chunks of their prompts from what is left (chunked
//! prefill: a long prompt is spread over several steps instead of stalling every stream). KV
//! blocks are taken as tokens arrive; a new sequence first reuses cached blocks of an identical
//! prompt prefix. When blocks run out, the most recently admitted sequence is preempted: its
//! blocks are freed and it goes back to the head of the queue, to be recomputed (its prompt and
//! generated tokens prefilled again) when room returns.
//!
//! [`Scheduler::apply`] records what a step computed and sampled. Whether a sequence is done
//! (end of sequence, stop strings, lengths) is the output processor's call; it tells the
//! scheduler through [`Scheduler::finish`]. The plan is what the workers need to keep their own
//! per-sequence state in step: each sequence's tokens and blocks are sent once, and the ids of
//! sequences that ended ride on the next plan.

use std::collections::VecDeque;

use caravan_proto as pb;

use crate::blocks::{BlockManager, HashChain};

/// Coordinator-assigned, unique while a sequence lives.
pub type SequenceId = u64;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch_size: usize,
    /// Most tokens computed in one step (decodes plus prefill chunks).
    pub max_batched_tokens: usize,
    /// Most requests waiting for a batch slot; beyond it, submissions are refused.
    pub max_waiting: usize,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedSequence {
    pub id: SequenceId,
    /// Its tokens to compute now (a prompt chunk, or the last sampled token).
    pub tokens: Vec<i64>,
    /// How many of its tokens the caches already hold.
    pub start_position: usize,
    /// Set on the first step after (re)admission: the workers start its block table afresh (and
    /// learn its sampling parameters, if it is new to them).
    pub admitted: Option<pb::SamplingParams>,
    /// How many of its leading tokens are its prompt (the workers need it with `admitted`).
    pub prompt_len: usize,
    /// Blocks appended to its table, covering the positions this step writes.
    pub new_blocks: Vec<u32>,
    /// Whether a token is sampled after this step (false for a non-final prompt chunk).
    pub sample: bool,
    /// The token after `tokens`, when known (a non-final chunk): its prompt log-probability
    /// comes from this step's last row.
    pub next_token: Option<i64>,
    /// Structured outputs: the tokens the sampled one may be (a bitmask); the engine fills it in.
    pub allowed_tokens: Option<Vec<u8>>,
    /// Planned before the step that samples its input had answered (asynchronous scheduling):
    /// `tokens` is empty, and the workers feed the one token they sampled for it last.
    pub feeds_sampled: bool,
}

impl PlannedSequence {
    /// Tokens it computes in the step.
    pub fn len(&self) -> usize {
        if self.feeds_sampled {
            1
        } else {
            self.tokens.len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the next step computes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub sequences: Vec<PlannedSequence>,
    /// Sequences the workers may forget (finished, cancelled or failed since the last plan).
    pub finished: Vec<SequenceId>,
    /// Sequences admitted to the batch for the first time in this plan (they leave the queue).
    pub first_admitted: Vec<SequenceId>,
    /// Sequences preempted while making this plan.
    pub preempted: Vec<SequenceId>,
    /// Prompt tokens looked up in the prefix cache while making this plan, and how many hit.
    pub prefix_queried_tokens: usize,
    pub prefix_hit_tokens: usize,
}

impl StepPlan {
    /// Whether the plan computes anything.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Tokens computed by the step.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(PlannedSequence::len).sum()
    }
}

/// A sequence as the scheduler sees it.
#[derive(Debug)]
struct Sequence {
    id: SequenceId,
    sampling: pb::SamplingParams,
    /// Prompt followed by the generated tokens.
    tokens: Vec<i64>,
    prompt_len: usize,
    /// Leading tokens whose keys and values are in the workers' caches.
    computed: usize,
    blocks: Vec<u32>,
    /// Leading blocks of `blocks` the workers have been sent since its (re)admission; `None`
    /// while it waits (its next step starts the workers' table afresh).
    blocks_sent: Option<usize>,
    chain: HashChain,
    /// Admitted to the batch at least once.
    ever_admitted: bool,
    /// Admitted since the workers' caches were last lost ([`Scheduler::restart`]): the ranks
    /// hold its per-sequence state (the tokens seen, for penalties and the random stream).
    known_to_workers: bool,
    /// A sequence with the same prompt (a sibling of `n` > 1) whose computed prompt this one
    /// reuses from the prefix cache: it is not admitted before that prompt is in the caches.
    after: Option<SequenceId>,
}

impl Sequence {
    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// The waiting queue, the running batch and the KV blocks they hold.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// In admission order: preemption takes from the back.
    running: Vec<Sequence>,
    /// Ended since the last plan, to tell the workers.
    finished: Vec<SequenceId>,
    next_id: SequenceId,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
        }
    }

    /// Queues a new sequence; returns its id.
    pub fn add(&mut self, prompt: Vec<i64>, sampling: pb::SamplingParams) -> SequenceId {
        self.add_after(prompt, sampling, None)
    }

    /// Queues a new sequence whose prompt is `leader`'s (the other choices of one request): it
    /// waits until `leader` has computed the prompt, then takes the prompt's full blocks from the
    /// prefix cache instead of computing them again. Without prefix caching, or for a sequence
    /// that scores its whole prompt, this is [`Scheduler::add`].
    pub fn add_after(
        &mut self,
        prompt: Vec<i64>,
        sampling: pb::SamplingParams,
        leader: Option<SequenceId>,
    ) -> SequenceId {
        let after = leader.filter(|_| {
            self.blocks.prefix_caching()
                && sampling.prompt_logprobs.is_none()
                && prompt.len() > self.blocks.block_size()
        });
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id: self.next_id,
            sampling,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            blocks_sent: None,
            chain: HashChain::default(),
            ever_admitted: false,
            known_to_workers: false,
            after,
        });
        self.next_id
    }

    /// Whether a waiting sequence may be admitted now: it follows no leader, or its leader has
    /// computed its prompt (or is gone).
    fn admissible(&self, seq: &Sequence) -> bool {
        let Some(leader) = seq.after else {
            return true;
        };
        if self.waiting.iter().any(|s| s.id == leader) {
            return false;
        }
        self.running
            .iter()
            .find(|s| s.id == leader)
            .is_none_or(|s| s.computed >= s.prompt_len)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Ids of the running sequences, in admission order.
    pub fn running_ids(&self) -> Vec<SequenceId> {
        self.running.iter().map(|s| s.id).collect()
    }

    /// Ids of every sequence, running first (admission order), then waiting (queue order).
    pub fn ids(&self) -> Vec<SequenceId> {
        self.running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.id)
            .collect()
    }

    /// A sequence's tokens (prompt and generated so far).
    pub fn tokens(&self, id: SequenceId) -> Option<&[i64]> {
        self.find(id).map(|s| s.tokens.as_slice())
    }

    fn find(&self, id: SequenceId) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
    }

    /// Ends a sequence (finished, cancelled or failed), wherever it is, and frees its blocks.
    /// Returns false if there was no such sequence.
    pub fn finish(&mut self, id: SequenceId) -> bool {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            match self.waiting.remove(i) {
                Some(seq) => seq,
                None => return false,
            }
        } else {
            return false;
        };
        self.blocks.release(&seq.blocks);
        if seq.known_to_workers {
            self.finished.push(id);
        }
        true
    }

    /// The workers lost every cache and per-sequence state (their group was formed again after
    /// a failure): every running sequence goes back to the queue, ahead of those waiting and in
    /// admission order, to be recomputed (prompt and generated tokens) exactly as after a
    /// preemption, and `blocks`, the new group's pool with an empty prefix cache, replaces the
    /// old. Returns how many sequences were running.
    pub fn restart(&mut self, blocks: BlockManager) -> usize {
        let running = self.running.len();
        for mut seq in self.running.drain(..).rev() {
            seq.blocks.clear();
            seq.blocks_sent = None;
            seq.computed = 0;
            seq.chain = HashChain::default();
            self.waiting.push_front(seq);
        }
        for seq in &mut self.waiting {
            seq.known_to_workers = false;
        }
        // The old group's ids mean nothing to the new one.
        self.finished.clear();
        self.blocks = blocks;
        running
    }

    /// Ends every sequence; returns their ids (running first, then waiting).
    pub fn finish_all(&mut self) -> Vec<SequenceId> {
        let ids = self.ids();
        for &id in &ids {
            self.finish(id);
        }
        ids
    }

    /// Chooses the next step's work: decodes first, then prefill chunks, under the token budget.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batched_tokens.max(1);
        let mut chosen: Vec<(SequenceId, usize)> = Vec::new();
        let order: Vec<SequenceId> = {
            let (decoding, prefilling): (Vec<&Sequence>, Vec<&Sequence>) =
                self.running.iter().partition(|s| s.remaining() == 1);
            decoding.iter().chain(&prefilling).map(|s| s.id).collect()
        };
        for id in order {
            if budget == 0 {
                break;
            }
            // Gone if an earlier sequence preempted it.
            let Some(mut i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let n = self.running[i].remaining().min(budget);
            let need = self.running[i].computed + n;
            let placed = loop {
                if self.blocks.grow(&mut self.running[i].blocks, need) {
                    break true;
                }
                // Preempt the most recently admitted sequence not yet in this step's plan, or
                // this one if there is none.
                let victim = self
                    .running
                    .iter()
                    .rposition(|s| s.id != id && !chosen.iter().any(|c| c.0 == s.id));
                match victim {
                    Some(v) => {
                        plan.preempted.push(self.running[v].id);
                        self.preempt(v);
                        if v < i {
                            i -= 1;
                        }
                    }
                    None => {
                        plan.preempted.push(id);
                        self.preempt(i);
                        break false;
                    }
                }
            };
            if placed {
                chosen.push((id, n));
                budget -= n;
            }
        }
        // Blocks are short after a preemption: admit nothing new this step.
        while plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.config.max_batch_size.max(1)
        {
            let Some(mut seq) = self
                .waiting
                .iter()
                .position(|s| self.admissible(s))
                .and_then(|i| self.waiting.remove(i))
            else {
                break;
            };
            // Admitted once, it recomputes on its own if it is ever preempted.
            seq.after = None;
            // A sequence that wants its prompt's log-probabilities computes every prompt token,
            // and one with a repetition penalty too: the workers must see every token it holds.
            if seq.blocks.is_empty()
                && seq.sampling.prompt_logprobs.is_none()
                && (seq.sampling.repetition_penalty <= 0.0
                    || seq.sampling.repetition_penalty == 1.0)
            {
                // Reuse cached blocks of an identical prefix; at least one token is computed so
                // the step yields logits. Workers new to the sequence must compute its generated
                // tokens themselves, to count them as generated.
                let reusable = match seq.known_to_workers {
                    true => seq.tokens.len() - 1,
                    false => seq.prompt_len.min(seq.tokens.len() - 1),
                };
                let hit = self.blocks.lookup_prefix(&seq.tokens, reusable);
                plan.prefix_queried_tokens += seq.tokens.len();
                plan.prefix_hit_tokens += hit.tokens;
                seq.blocks = hit.blocks;
                seq.chain = hit.chain;
                seq.computed = hit.tokens;
            }
            let n = seq.remaining().min(budget);
            if !self.blocks.grow(&mut seq.blocks, seq.computed + n) {
                // Wait for running sequences to finish; keep nothing meanwhile.
                self.requeue_for_recompute(seq);
                break;
            }
            if !std::mem::replace(&mut seq.ever_admitted, true) {
                plan.first_admitted.push(seq.id);
            }
            seq.known_to_workers = true;
            chosen.push((seq.id, n));
            budget -= n;
            self.running.push(seq);
        }
        for (id, n) in chosen {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            let (admitted, sent) = match seq.blocks_sent {
                Some(sent) => (None, sent),
                None => (Some(seq.sampling.clone()), 0),
            };
            let end = seq.computed + n;
            plan.sequences.push(PlannedSequence {
                id,
                tokens: seq.tokens[seq.computed..end].to_vec(),
                start_position: seq.computed,
                admitted,
                prompt_len: seq.prompt_len,
                new_blocks: seq.blocks[sent..].to_vec(),
                sample: end == seq.tokens.len(),
                next_token: seq.tokens.get(end).copied(),
                allowed_tokens: None,
                feeds_sampled: false,
            });
            seq.blocks_sent = Some(seq.blocks.len());
        }
        // Only a plan that runs reaches the workers: an empty one keeps them for the next.
        if !plan.sequences.is_empty() {
            plan.finished = std::mem::take(&mut self.finished);
        }
        plan
    }

    /// Plans the step after `in_flight` before its answer arrives (asynchronous scheduling):
    /// every running sequence decodes one more token, its input the token the ranks sample for it
    /// in `in_flight`, which they feed themselves. Nothing is admitted, preempted or prefilled, so
    /// `None` unless every running sequence samples in `in_flight`, the budget takes them all, no
    /// request waits for a free batch slot and the pool has the blocks they need; the engine then
    /// waits for the answer and plans as usual.
    pub fn schedule_ahead(&mut self, in_flight: &StepPlan) -> Option<StepPlan> {
        if self.running.is_empty() || self.running.len() > self.config.max_batched_tokens.max(1) {
            return None;
        }
        // Requests waiting for a free batch slot are admitted by a plan made with the answer in.
        if self.running.len() < self.config.max_batch_size.max(1)
            && self.waiting.iter().any(|s| self.admissible(s))
        {
            return None;
        }
        // Each sequence's length once `in_flight` has run and the fed token is computed too.
        let lengths: Vec<usize> = self
            .running
            .iter()
            .map(|seq| {
                in_flight
                    .sequences
                    .iter()
                    .find(|p| p.id == seq.id && p.sample)
                    .map(|p| p.start_position + p.len() + 1)
            })
            .collect::<Option<_>>()?;
        let new_blocks: usize = self
            .running
            .iter()
            .zip(&lengths)
            .map(|(seq, &len)| self.blocks.blocks_for(len).saturating_sub(seq.blocks.len()))
            .sum();
        if new_blocks > self.blocks.available_blocks() {
            return None;
        }
        let mut plan = StepPlan::default();
        for (seq, len) in self.running.iter_mut().zip(lengths) {
            let grown = self.blocks.grow(&mut seq.blocks, len);
            debug_assert!(grown, "blocks counted above");
            let sent = seq.blocks_sent.unwrap_or(0);
            plan.sequences.push(PlannedSequence {
                id: seq.id,
                tokens: Vec::new(),
                feeds_sampled: true,
                start_position: len - 1,
                admitted: None,
                prompt_len: seq.prompt_len,
                new_blocks: seq.blocks[sent..].to_vec(),
                sample: true,
                next_token: None,
                allowed_tokens: None,
            });
            seq.blocks_sent = Some(seq.blocks.len());
        }
        plan.finished = std::mem::take(&mut self.finished);
        Some(plan)
    }

    /// Frees running sequence `index`'s blocks and puts it back at the head of the queue.
    fn preempt(&mut self, index: usize) {
        let seq = self.running.remove(index);
        tracing::debug!(
            id = seq.id,
            tokens = seq.tokens.len(),
            "preempted for KV-cache room"
        );
        self.requeue_for_recompute(seq);
    }

    /// Frees `seq`'s blocks and puts it at the head of the queue, to be prefilled from scratch
    /// (prompt and generated tokens) when it is admitted again.
    fn requeue_for_recompute(&mut self, mut seq: Sequence) {
        self.blocks.release(&seq.blocks);
        seq.blocks.clear();
        seq.blocks_sent = None;
        seq.computed = 0;
        seq.chain = HashChain::default();
        self.waiting.push_front(seq);
    }

    /// Records a step's results: the planned tokens are in the caches now, and `sampled` holds
    /// the token sampled for each sequence that asked for one.
    pub fn apply(&mut self, plan: &StepPlan, sampled: &[(SequenceId, i64)]) {
        for item in &plan.sequences {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == item.id) {
                seq.computed = item.start_position + item.len();
                self.blocks.register_full_blocks(
                    &seq.blocks,
                    &seq.tokens[..seq.computed],
                    &mut seq.chain,
                );
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
                seq.tokens.push(token);
            }
        }
    }

    /// Tokens generated so far by sequence `id`.
    pub fn generated(&self, id: SequenceId) -> usize {
        self.find(id).map_or(0, |s| s.tokens.len() - s.prompt_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(blocks: usize, block_size: usize, batch: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_batch_size: batch,
                max_batched_tokens: budget,
                max_waiting: 100,
            },
            BlockManager::new(blocks, block_size, true),
        )
    }

    /// Plans a step and runs it as the workers would ([`answer`]).
    fn step(s: &mut Scheduler, token: i64) -> StepPlan {
        let plan = s.schedule();
        answer(s, &plan, token);
        plan
    }

    fn shape(plan: &StepPlan) -> Vec<(SequenceId, usize, usize, bool)> {
        plan.sequences
            .iter()
            .map(|p| (p.id, p.start_position, p.len(), p.sample))
            .collect()
    }

    #[test]
    fn admission_follows_queue_order_and_batch_size() {
        let mut s = scheduler(64, 4, 2, 100);
        let a = s.add(vec![1, 2, 3], Default::default());
        let b = s.add(vec![4, 5], Default::default());
        let c = s.add(vec![6], Default::default());
        let plan = step(&mut s, 9);
        assert_eq!(shape(&plan), vec![(a, 0, 3, true), (b, 0, 2, true)]);
        assert_eq!(plan.first_admitted, vec![a, b]);
        assert_eq!((s.running(), s.waiting()), (2, 1));
        // Decodes only, until a slot frees.
        let plan = step(&mut s, 9);
        assert_eq!(shape(&plan), vec![(a, 3, 1, true), (b, 2, 1, true)]);
        assert!(s.finish(a));
        let plan = step(&mut s, 9);
        assert_eq!(plan.finished, vec![a], "the workers hear of it once");
        assert_eq!(shape(&plan), vec![(b, 3, 1, true), (c, 0, 1, true)]);
        assert_eq!(s.tokens(b), Some(&[4, 5, 9, 9, 9][..]));
        assert!(step(&mut s, 9).finished.is_empty());
    }

    #[test]
    fn long_prompts_are_chunked_under_the_token_budget_and_decodes_go_first() {
        let mut s = scheduler(64, 4, 8, 4);
        let a = s.add(vec![1, 2], Default::default());
        assert_eq!(shape(&step(&mut s, 7)), vec![(a, 0, 2, true)]);
        let b = s.add((10..20).collect(), Default::default());
        // a decodes first; b's prompt takes what is left, chunk by chunk, sampling at its end.
        assert_eq!(
            shape(&step(&mut s, 7)),
            vec![(a, 2, 1, true), (b, 0, 3, false)]
        );
        assert_eq!(
            shape(&step(&mut s, 7)),
            vec![(a, 3, 1, true), (b, 3, 3, false)]
        );
        assert_eq!(
            shape(&step(&mut s, 7)),
            vec![(a, 4, 1, true), (b, 6, 3, false)]
        );
        assert_eq!(
            shape(&step(&mut s, 7)),
            vec![(a, 5, 1, true), (b, 9, 1, true)]
        );
        assert_eq!(s.generated(b), 1);
    }

    #[test]
    fn blocks_are_sent_once_and_the_table_restarts_on_admission() {
        let mut s = scheduler(64, 2, 8, 100);
        let sampling = pb::SamplingParams {
            seed: 42,
            ..Default::default()
        };
        let a = s.add(vec![1, 2, 3], sampling.clone());
        let first = step(&mut s, 5);
        let p = &first.sequences[0];
        assert_eq!((p.id, p.admitted.clone()), (a, Some(sampling.clone())));
        assert_eq!(p.new_blocks.len(), 2, "3 tokens in blocks of 2");
        // Token 4 fits in the second block: nothing new to send; token 5 needs a third.
        let second = step(&mut s, 5);
        assert_eq!(second.sequences[0].admitted, None);
        assert!(second.sequences[0].new_blocks.is_empty());
        let third = step(&mut s, 5);
        assert_eq!(third.sequences[0].new_blocks.len(), 1);
        assert!(!p.new_blocks.contains(&third.sequences[0].new_blocks[0]));
    }

    #[test]
    fn preemption_frees_the_newest_sequence_and_recomputes_it_with_its_tokens() {
        // 4 blocks of 2 tokens: two sequences of 3 tokens take 2 blocks each; both need a third
        // block to go on, so the newer is preempted and the older keeps running.
        let mut s = scheduler(4, 2, 8, 100);
        let a = s.add(vec![1, 2, 3], Default::default());
        let b = s.add(vec![4, 5, 6], Default::default());
        step(&mut s, 8); // both prefilled: a = 1 2 3 8, b = 4 5 6 8
        step(&mut s, 8); // a's 4th token fits: a = 1 2 3 8 8, b = 4 5 6 8 8
        let plan = step(&mut s, 8);
        assert_eq!(plan.preempted, vec![b]);
        assert_eq!(shape(&plan), vec![(a, 4, 1, true)]);
        assert_eq!((s.running(), s.waiting()), (1, 1));
        assert_eq!(s.blocks().used_blocks(), 3);
        // When a finishes, b comes back and recomputes its prompt and its generated tokens.
        s.finish(a);
        let plan = step(&mut s, 8);
        assert_eq!(shape(&plan), vec![(b, 0, 5, true)]);
        let p = &plan.sequences[0];
        assert_eq!(p.tokens, vec![4, 5, 6, 8, 8]);
        assert!(p.admitted.is_some(), "the workers restart its block table");
        assert_eq!(p.new_blocks.len(), 3);
        assert!(
            plan.first_admitted.is_empty(),
            "it left the queue the first time"
        );
        assert_eq!(plan.finished, vec![a]);
    }

    #[test]
    fn a_sequence_alone_without_room_is_preempted_not_spun_on() {
        let mut s = scheduler(2, 2, 8, 100);
        let a = s.add(vec![1, 2, 3], Default::default());
        step(&mut s, 8); // 1 2 3 8
        step(&mut s, 8); // 1 2 3 8 8: both blocks full, the next token needs a third
        let plan = step(&mut s, 8);
        assert_eq!(plan.preempted, vec![a]);
        assert!(plan.is_empty());
        assert_eq!(s.blocks().used_blocks(), 0);
    }

    #[test]
    fn identical_prefixes_reuse_cached_blocks() {
        let mut s = scheduler(16, 2, 8, 100);
        let a = s.add(vec![1, 2, 3, 4, 5], Default::default());
        step(&mut s, 9);
        s.finish(a);
        let b = s.add(vec![1, 2, 3, 4, 6], Default::default());
        let plan = step(&mut s, 9);
        assert_eq!(plan.prefix_queried_tokens, 5);
        assert_eq!(plan.prefix_hit_tokens, 4);
        assert_eq!(shape(&plan), vec![(b, 4, 1, true)]);
        let p = &plan.sequences[0];
        assert_eq!(
            p.new_blocks.len(),
            3,
            "the cached blocks are in its table too"
        );
        // A whole-prompt hit still computes the last token, for its logits.
        s.finish(b);
        let c = s.add(vec![1, 2, 3, 4], Default::default());
        let plan = step(&mut s, 9);
        assert_eq!(plan.prefix_hit_tokens, 2);
        assert_eq!(shape(&plan), vec![(c, 2, 2, true)]);
    }

    #[test]
    fn siblings_wait_for_the_leaders_prompt_then_share_its_blocks() {
        // Budget 4: the 7-token prompt takes two steps.
        let mut s = scheduler(16, 2, 8, 4);
        let prompt: Vec<i64> = (1..=7).collect();
        let a = s.add(prompt.clone(), Default::default());
        let b = s.add_after(prompt.clone(), Default::default(), Some(a));
        let c = s.add_after(prompt.clone(), Default::default(), Some(a));
        let other = s.add(vec![20, 21], Default::default());
        let plan = step(&mut s, 9);
        assert_eq!(shape(&plan), vec![(a, 0, 4, false)], "the siblings wait");
        let plan = step(&mut s, 9);
        assert_eq!(
            shape(&plan),
            vec![(a, 4, 3, true), (other, 0, 1, false)],
            "a later request is not held behind them"
        );
        let plan = step(&mut s, 9);
        // a decodes; b and c take the prompt's three full blocks from the cache and compute
        // only its last token.
        assert_eq!(
            shape(&plan),
            vec![
                (a, 7, 1, true),
                (other, 1, 1, true),
                (b, 6, 1, true),
                (c, 6, 1, true)
            ]
        );
        assert_eq!(plan.prefix_hit_tokens, 12);
        // A leader that ends before its prompt is computed releases its siblings.
        for id in [a, other, b, c] {
            s.finish(id);
        }
        let d = s.add((30..37).collect(), Default::default());
        let e = s.add_after((30..37).collect(), Default::default(), Some(d));
        s.finish(d);
        assert!(s.schedule().sequences.iter().any(|p| p.id == e));
    }

    #[test]
    fn siblings_of_a_prompt_that_is_scored_are_not_held() {
        let mut s = scheduler(16, 2, 8, 100);
        let scored = pb::SamplingParams {
            prompt_logprobs: Some(1),
            ..Default::default()
        };
        let a = s.add(vec![1, 2, 3, 4, 5], scored.clone());
        let b = s.add_after(vec![1, 2, 3, 4, 5], scored, Some(a));
        let plan = step(&mut s, 9);
        assert_eq!(shape(&plan), vec![(a, 0, 5, true), (b, 0, 5, true)]);
        assert_eq!(plan.prefix_queried_tokens, 0);
    }

    #[test]
    fn cancelled_sequences_free_their_blocks_and_only_admitted_ones_are_reported() {
        let mut s = scheduler(16, 2, 1, 100);
        let a = s.add(vec![1, 2, 3], Default::default());
        let b = s.add(vec![4, 5, 6], Default::default());
        step(&mut s, 7);
        assert_eq!(s.blocks().used_blocks(), 2);
        assert!(s.finish(b), "waiting");
        assert!(s.finish(a), "running");
        assert!(!s.finish(a), "already gone");
        assert_eq!(s.blocks().used_blocks(), 0);
        assert!(s.is_idle());
        let plan = s.schedule();
        assert!(plan.is_empty());
        assert!(plan.finished.is_empty(), "an empty plan is never sent");
        let c = s.add(vec![7], Default::default());
        let plan = s.schedule();
        assert_eq!(shape(&plan), vec![(c, 0, 1, true)]);
        assert_eq!(plan.finished, vec![a], "b never reached the workers");
    }

    #[test]
    fn after_a_restart_the_running_sequences_are_recomputed_first_on_the_new_pool() {
        // Batch of 2: a and b run, c waits.
        let mut s = scheduler(16, 2, 2, 100);
        let a = s.add(vec![1, 2, 3], Default::default());
        let b = s.add(vec![4, 5], Default::default());
        let c = s.add(vec![6], Default::default());
        step(&mut s, 8); // a = 1 2 3 8, b = 4 5 8
        step(&mut s, 9); // a = 1 2 3 8 9, b = 4 5 8 9
        s.finish(b); // b's end never reached the old group's workers
        let d = s.add(vec![7, 7], Default::default());
        // The group is lost; the new one has a pool of its own (here of another size).
        assert_eq!(s.restart(BlockManager::new(8, 2, true)), 1);
        assert_eq!(s.blocks().total_blocks(), 8);
        assert_eq!(s.blocks().used_blocks(), 0);
        let plan = step(&mut s, 5);
        // a first (it was running), then c and d in arrival order, each from position 0 and
        // admitted again with its prompt's length; nothing finished is reported to the new group.
        assert_eq!(shape(&plan), vec![(a, 0, 5, true), (c, 0, 1, true)]);
        let p = &plan.sequences[0];
        assert_eq!(p.tokens, vec![1, 2, 3, 8, 9]);
        assert_eq!(p.prompt_len, 3);
        assert!(p.admitted.is_some());
        assert_eq!(p.new_blocks.len(), 3);
        assert_eq!(plan.sequences[1].prompt_len, 1);
        assert!(plan.finished.is_empty(), "the new group never knew b");
        assert_eq!(plan.first_admitted, vec![c]);
        assert_eq!((s.running(), s.waiting()), (2, 1));
        s.finish(c);
        let plan = step(&mut s, 5);
        assert_eq!(shape(&plan), vec![(a, 5, 1, true), (d, 0, 2, true)]);
        assert_eq!(plan.finished, vec![c]);
    }

    #[test]
    fn finish_all_ends_running_and_waiting() {
        let mut s = scheduler(16, 2, 1, 100);
        let a = s.add(vec![1], Default::default());
        let b = s.add(vec![2], Default::default());
        step(&mut s, 7);
        assert_eq!(s.finish_all(), vec![a, b]);
        assert!(s.is_idle());
        assert_eq!(s.blocks().used_blocks(), 0);
    }

    /// Runs `plan` as the workers would, sampling `token` for every sequence that asks.
    fn answer(s: &mut Scheduler, plan: &StepPlan, token: i64) {
        let sampled: Vec<_> = plan
            .sequences
            .iter()
            .filter(|p| p.sample)
            .map(|p| (p.id, token))
            .collect();
        s.apply(plan, &sampled);
    }

    #[test]
    fn steps_planned_ahead_equal_the_steps_planned_with_the_answers() {
        // Block size 2, so the runs cross block boundaries.
        let (mut sync, mut ahead) = (scheduler(64, 2, 4, 100), scheduler(64, 2, 4, 100));
        for s in [&mut sync, &mut ahead] {
            s.add(vec![1, 2, 3], Default::default());
            s.add(vec![4, 5], Default::default());
        }
        let mut synced = Vec::new();
        for token in 10..16 {
            synced.push(step(&mut sync, token));
        }
        // The first plan with nothing in flight, then each planned before the last answered.
        let mut in_flight = ahead.schedule();
        let mut planned = vec![in_flight.clone()];
        for token in 10..15 {
            let next = ahead
                .schedule_ahead(&in_flight)
                .expect("every sequence decodes on");
            assert!(next
                .sequences
                .iter()
                .all(|p| p.feeds_sampled && p.tokens.is_empty()));
            answer(&mut ahead, &in_flight, token);
            planned.push(next.clone());
            in_flight = next;
        }
        answer(&mut ahead, &in_flight, 15);
        let layout = |plans: &[StepPlan]| {
            plans
                .iter()
                .map(|p| {
                    p.sequences
                        .iter()
                        .map(|q| (q.id, q.start_position, q.len(), q.new_blocks.clone()))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(layout(&planned), layout(&synced));
        for id in [1, 2] {
            assert_eq!(ahead.tokens(id), sync.tokens(id));
        }
        assert_eq!(ahead.blocks().used_blocks(), sync.blocks().used_blocks());
    }

    #[test]
    fn nothing_is_planned_ahead_that_needs_the_answer_or_an_admission() {
        // A prompt still prefilling (a budget of 4 tokens per step) does not sample.
        let mut s = scheduler(64, 4, 2, 4);
        s.add(vec![1; 6], Default::default());
        let chunk = s.schedule();
        assert!(!chunk.sequences[0].sample);
        assert!(s.schedule_ahead(&chunk).is_none());
        answer(&mut s, &chunk, 9);
        let last_chunk = s.schedule();
        let ahead = s
            .schedule_ahead(&last_chunk)
            .expect("the last chunk samples");
        answer(&mut s, &last_chunk, 9);
        // A request waiting for a free batch slot is admitted by a plan made with the answer.
        s.add(vec![7], Default::default());
        assert!(s.schedule_ahead(&ahead).is_none());
        answer(&mut s, &ahead, 9);
        let both = s.schedule();
        assert_eq!(both.sequences.len(), 2);
        // With the batch full, the next one waits anyway: the running decode on ahead.
        s.add(vec![8], Default::default());
        assert!(s.schedule_ahead(&both).is_some());
    }

    #[test]
    fn a_step_planned_ahead_needs_its_blocks_free_and_tells_the_finished() {
        // Two blocks of 2 tokens.
        let mut s = scheduler(2, 2, 4, 100);
        let a = s.add(vec![1, 2], Default::default());
        let first = s.schedule();
        let second = s
            .schedule_ahead(&first)
            .expect("position 2 takes the second block");
        assert_eq!(second.sequences[0].new_blocks.len(), 1);
        answer(&mut s, &first, 9);
        let third = s
            .schedule_ahead(&second)
            .expect("position 3 fits the second block");
        answer(&mut s, &second, 9);
        // Position 4 needs a third block: the engine waits for the answer (and the scheduler
        // preempts).
        assert!(s.schedule_ahead(&third).is_none());
        answer(&mut s, &third, 9);
        assert!(s.finish(a));
        let b = s.add(vec![3], Default::default());
        let plan = s.schedule();
        assert_eq!(plan.finished, vec![a]);
        answer(&mut s, &plan, 9);
        let c = s.add(vec![4], Default::default());
        let both = s.schedule();
        assert_eq!(both.sequences.len(), 2);
        // `b` ends by the answer before `both`'s.
        assert!(s.finish(b));
        let ahead = s.schedule_ahead(&both).expect("c decodes on");
        let ids: Vec<SequenceId> = ahead.sequences.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![c]);
        assert_eq!(
            ahead.finished,
            vec![b],
            "the ids that ended ride on the plan"
        );
    }
}
