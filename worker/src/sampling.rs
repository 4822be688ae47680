//! Choosing the next token from a row of logits: OpenAI's logit bias and penalties,
//! transformers' repetition penalty, vLLM's `min_tokens`, temperature, top-k, top-p, and
//! log-probabilities for the response.
//!
//! Every rank holds identical logits after the last collective and runs this same code with the
//! same per-sequence random stream (ChaCha seeded by the request's seed; the draw for the n-th
//! generated token is the stream's n-th), so all ranks choose the same token without
//! communicating, and a rank that joins a sequence late (the group formed again after a failure,
//! the sequence recomputed) draws what the lost rank would have.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// Validated sampling parameters of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    pub seed: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Alternatives to report (0-5 in the OpenAI API; any number here).
    pub top_logprobs: usize,
    /// Report prompt tokens' log-probabilities, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling.
    pub logit_bias: Vec<(i64, f32)>,
    /// Over the prompt and the generated tokens; 1 disables.
    pub repetition_penalty: f32,
    /// `min_tokens_banned` is not sampled before this many tokens have been.
    pub min_tokens: usize,
    pub min_tokens_banned: Vec<i64>,
}

impl SamplingParams {
    /// Whether the row's logits change before the choice (penalties, bias, `min_tokens`): such a
    /// row is sampled on the host, from its own copy of the logits.
    pub fn reshapes_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
            || (self.min_tokens > 0 && !self.min_tokens_banned.is_empty())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_logprobs: 0,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            repetition_penalty: 1.0,
            min_tokens: 0,
            min_tokens_banned: Vec::new(),
        }
    }
}

/// What was chosen, with its log-probability under the model and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: i64,
    pub logprob: f32,
    pub top_logprobs: Vec<(i64, f32)>,
}

/// Per-sequence sampling state that lives across steps.
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    rng: ChaCha12Rng,
    /// How often each token has been generated so far (for the penalties).
    counts: HashMap<i64, u32>,
    /// Every token of the sequence so far, prompt included (for the repetition penalty).
    seen: HashSet<i64>,
    /// Tokens generated so far (sampled here, or replayed by [`SequenceSampler::observe`]).
    generated: usize,
    /// How many of the sequence's leading tokens are its prompt.
    prompt_len: usize,
}

impl SequenceSampler {
    /// The sampler of a sequence whose first `prompt_len` tokens are its prompt.
    pub fn new(seed: u64, prompt_len: usize) -> Self {
        SequenceSampler {
            rng: ChaCha12Rng::seed_from_u64(seed),
            counts: HashMap::new(),
            seen: HashSet::new(),
            generated: 0,
            prompt_len,
        }
    }

    /// Records a step's input: `tokens` at positions from `start_position` (prompt chunks, then
    /// each sampled token as the next step feeds it back). A generated token this sampler did
    /// not sample itself (the sequence is recomputed on a rank that joined after a failure)
    /// counts as if it had: penalties, `min_tokens` and the random stream go on from there.
    /// Tokens recomputed after a preemption are recorded again, harmlessly.
    pub fn observe(&mut self, tokens: &[i64], start_position: usize, params: &SamplingParams) {
        if params.repetition_penalty != 1.0 {
            self.seen.extend(tokens);
        }
        let replayed_from = (self.prompt_len + self.generated).saturating_sub(start_position);
        for &token in tokens.iter().skip(replayed_from) {
            *self.counts.entry(token).or_insert(0) += 1;
            self.generated += 1;
        }
    }

    /// Chooses a token from `logits` (one row over the vocabulary) and records it.
    /// `log_sum_exp` is `ln Σ exp(logits)` of the row (the engine computes it for the whole batch
    /// in one vectorised libtorch call), so a log-probability is just `logit − log_sum_exp` and
    /// the vocabulary is never exponentiated here.
    pub fn sample(&mut self, logits: &[f32], log_sum_exp: f32, params: &SamplingParams) -> Sampled {
        self.sample_masked(logits, log_sum_exp, params, None)
    }

    /// [`SequenceSampler::sample`] among the tokens `allowed` sets (structured outputs: bit
    /// `t % 8` of byte `t / 8`; tokens past its end are not allowed). The reported
    /// log-probabilities stay the model's own.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        log_sum_exp: f32,
        params: &SamplingParams,
        allowed: Option<&[u8]>,
    ) -> Sampled {
        let reshaped;
        let scores = if params.reshapes_logits() || allowed.is_some() {
            let mut scores = logits.to_vec();
            if let Some(allowed) = allowed {
                for (t, s) in scores.iter_mut().enumerate() {
                    if allowed
                        .get(t / 8)
                        .is_none_or(|byte| byte & (1 << (t % 8)) == 0)
                    {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            if params.repetition_penalty > 0.0 && params.repetition_penalty != 1.0 {
                let penalty = params.repetition_penalty;
                for &token in &self.seen {
                    if let Some(s) = logit_of(&mut scores, token) {
                        *s = if *s > 0.0 { *s / penalty } else { *s * penalty };
                    }
                }
            }
            for (&token, &count) in &self.counts {
                if let Some(s) = logit_of(&mut scores, token) {
                    *s -= params.presence_penalty + params.frequency_penalty * count as f32;
                }
            }
            for &(token, bias) in &params.logit_bias {
                if let Some(s) = logit_of(&mut scores, token) {
                    *s += bias;
                }
            }
            if self.generated < params.min_tokens {
                for &token in &params.min_tokens_banned {
                    if let Some(s) = logit_of(&mut scores, token) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            reshaped = scores;
            &reshaped[..]
        } else {
            logits
        };
        let token = if params.temperature <= 0.0 {
            argmax(scores)
        } else {
            self.draw(scores, params)
        };
        self.record(token as i64);
        Sampled {
            token: token as i64,
            logprob: logits[token] - log_sum_exp,
            top_logprobs: top_n(logits, params.top_logprobs)
                .into_iter()
                .map(|(t, logit)| (t, logit - log_sum_exp))
                .collect(),
        }
    }

    /// The uniform draw in [0, 1) for the token about to be generated: the stream's n-th for the
    /// n-th generated token, whatever came before (two 32-bit words per f64), so a rank that
    /// joined late draws what the others do. Where the choice is made (here or on the device)
    /// does not change it.
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.set_word_pos(2 * self.generated as u128);
        self.rng.random()
    }

    /// Records a token chosen for this sequence (here, or on the device from
    /// [`SequenceSampler::next_uniform`]): the penalties and `min_tokens` count it.
    pub fn record(&mut self, token: i64) {
        *self.counts.entry(token).or_insert(0) += 1;
        self.generated += 1;
    }

    /// Samples from softmax(scores / T) restricted to the top-k and the top-p nucleus.
    fn draw(&mut self, scores: &[f32], params: &SamplingParams) -> usize {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        // Descending by score; ties by token id so every rank orders identically.
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if params.top_k > 0 {
            order.truncate(params.top_k.min(order.len()));
        }
        let max = scores[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((scores[i] - max) / params.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if params.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    mass += p;
                    mass >= params.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u = self.next_uniform();
        let mut acc = 0.0;
        for (p, &token) in probs.iter().zip(&order) {
            acc += p;
            if u < acc {
                return token;
            }
        }
        *order.last().expect("at least one candidate")
    }
}

/// A token's entry in a row (none for an id outside the vocabulary).
fn logit_of(row: &mut [f32], token: i64) -> Option<&mut f32> {
    usize::try_from(token).ok().and_then(|t| row.get_mut(t))
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `ln Σ exp(xs)`, computed stably; what [`SequenceSampler::sample`] needs when the caller has
/// no batched value at hand.
pub fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// A known token's place in a row of logits (prompt log-probabilities: nothing is drawn).
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub logprob: f32,
    /// Tokens at least as likely, itself included (1: the most likely), as vLLM counts.
    pub rank: u32,
    /// The row's most likely tokens.
    pub top: Vec<(i64, f32)>,
}

/// Scores `token` in a row of logits, with the row's `n` most likely alternatives.
pub fn score(logits: &[f32], log_sum_exp: f32, token: i64, n: usize) -> Score {
    let own = usize::try_from(token)
        .ok()
        .and_then(|t| logits.get(t))
        .copied();
    let rank = own.map_or(logits.len(), |own| {
        logits.iter().filter(|&&l| l >= own).count()
    });
    Score {
        logprob: own.map_or(f32::NEG_INFINITY, |l| l - log_sum_exp),
        rank: rank as u32,
        top: top_n(logits, n)
            .into_iter()
            .map(|(t, logit)| (t, logit - log_sum_exp))
            .collect(),
    }
}

/// The `n` largest values with their indices, largest first (ties by index).
fn top_n(logprobs: &[f32], n: usize) -> Vec<(i64, f32)> {
    if n == 0 {
        return vec![];
    }
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i as i64, logprobs[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    fn lse() -> f32 {
        log_sum_exp(&logits())
    }

    #[test]
    fn greedy_picks_the_maximum_and_reports_its_logprob() {
        let s = SequenceSampler::new(0, 0).sample(&logits(), lse(), &SamplingParams::default());
        assert_eq!(s.token, 1);
        let expected = 3.0 - logits().iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((s.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn top_logprobs_are_sorted_and_sum_below_one() {
        let params = SamplingParams {
            top_logprobs: 3,
            ..Default::default()
        };
        let s = SequenceSampler::new(0, 0).sample(&logits(), lse(), &params);
        let ids: Vec<i64> = s.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 4, 2]);
        let mass: f32 = s.top_logprobs.iter().map(|t| t.1.exp()).sum();
        assert!(mass < 1.0 && mass > 0.5);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_1_is_greedy() {
        let params = SamplingParams {
            temperature: 1.5,
            seed: 42,
            ..Default::default()
        };
        let run = |seed| {
            let mut s = SequenceSampler::new(seed, 0);
            (0..50)
                .map(|_| s.sample(&logits(), lse(), &params).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(
            run(42),
            run(43),
            "different seeds should differ over 50 draws"
        );
        let greedy_k = SamplingParams {
            top_k: 1,
            ..params.clone()
        };
        let mut s = SequenceSampler::new(7, 0);
        assert!((0..20).all(|_| s.sample(&logits(), lse(), &greedy_k).token == 1));
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Token 1 and 4 carry almost all mass at low temperature; p=0.5 keeps only token 1.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            ..Default::default()
        };
        let mut s = SequenceSampler::new(1, 0);
        assert!((0..50).all(|_| s.sample(&logits(), lse(), &params).token == 1));
    }

    #[test]
    fn penalties_discourage_repeats() {
        let params = SamplingParams {
            frequency_penalty: 2.0,
            ..Default::default()
        };
        let mut s = SequenceSampler::new(0, 0);
        let first = s.sample(&logits(), lse(), &params).token;
        let second = s.sample(&logits(), lse(), &params).token;
        assert_eq!(
            (first, second),
            (1, 4),
            "token 1 penalised after its first use"
        );
    }

    #[test]
    fn logit_bias_forces_and_bans_tokens() {
        let forced = SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..Default::default()
        };
        assert_eq!(
            SequenceSampler::new(0, 0)
                .sample(&logits(), lse(), &forced)
                .token,
            3
        );
        let banned = SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..Default::default()
        };
        let s = SequenceSampler::new(0, 0).sample(&logits(), lse(), &banned);
        assert_eq!(s.token, 4, "the runner-up");
        // The reported log-probability is the model's own.
        assert!((s.logprob - (logits()[4] - lse())).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        // 3.0 / 1.5 = 2.0 falls below 2.9: the runner-up wins once token 1 has been seen.
        let mut s = SequenceSampler::new(0, 0);
        assert_eq!(
            s.sample(&logits(), lse(), &params).token,
            1,
            "nothing seen yet"
        );
        let mut s = SequenceSampler::new(0, 1);
        s.observe(&[1], 0, &params);
        assert_eq!(s.sample(&logits(), lse(), &params).token, 4);
        // A negative logit is pushed further down (multiplied), not up.
        let negative = vec![-1.0, -1.2, -3.0];
        let mut s = SequenceSampler::new(0, 1);
        s.observe(&[0], 0, &params);
        assert_eq!(
            s.sample(&negative, log_sum_exp(&negative), &params).token,
            1
        );
    }

    #[test]
    fn min_tokens_holds_back_banned_tokens_until_enough_are_generated() {
        let params = SamplingParams {
            min_tokens: 2,
            min_tokens_banned: vec![1],
            ..Default::default()
        };
        let mut s = SequenceSampler::new(0, 0);
        let picks: Vec<i64> = (0..3)
            .map(|_| s.sample(&logits(), lse(), &params).token)
            .collect();
        assert_eq!(picks, vec![4, 4, 1]);
    }

    #[test]
    fn a_mask_restricts_the_choice_greedy_and_sampled() {
        // Only tokens 2 and 3 allowed (bits 2 and 3 of byte 0).
        let mask = [0b0000_1100u8];
        let mut s = SequenceSampler::new(0, 0);
        let greedy = s.sample_masked(&logits(), lse(), &SamplingParams::default(), Some(&mask));
        assert_eq!(greedy.token, 2);
        assert!(
            (greedy.logprob - (logits()[2] - lse())).abs() < 1e-6,
            "the model's own"
        );
        let hot = SamplingParams {
            temperature: 2.0,
            ..Default::default()
        };
        for seed in 0..50 {
            let t = SequenceSampler::new(seed, 0)
                .sample_masked(&logits(), lse(), &hot, Some(&mask))
                .token;
            assert!(t == 2 || t == 3, "{t}");
        }
    }

    #[test]
    fn a_score_ranks_the_token_among_the_row() {
        let s = score(&logits(), lse(), 4, 2);
        assert_eq!(s.rank, 2, "only token 1 is more likely");
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!((s.logprob - (logits()[4] - lse())).abs() < 1e-6);
        assert_eq!(score(&logits(), lse(), 1, 0).rank, 1);
    }

    #[test]
    fn a_rank_that_replays_the_generated_tokens_samples_what_the_lost_rank_would_have() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 11,
            frequency_penalty: 0.4,
            presence_penalty: 0.2,
            min_tokens: 3,
            min_tokens_banned: vec![4],
            ..Default::default()
        };
        let prompt = [2, 3];
        // The rank that served the sequence from the start: prompt, then each token fed back.
        let mut original = SequenceSampler::new(params.seed, prompt.len());
        original.observe(&prompt, 0, &params);
        let mut tokens = prompt.to_vec();
        for _ in 0..6 {
            let t = original.sample(&logits(), lse(), &params).token;
            original.observe(&[t], tokens.len(), &params);
            tokens.push(t);
        }
        // A rank new to it recomputes prompt and generated tokens, in two chunks.
        let mut joined = SequenceSampler::new(params.seed, prompt.len());
        joined.observe(&tokens[..3], 0, &params);
        joined.observe(&tokens[3..], 3, &params);
        assert_eq!(joined.generated, original.generated);
        assert_eq!(joined.counts, original.counts);
        let next: Vec<i64> = (0..20)
            .map(|_| {
                let a = original.sample(&logits(), lse(), &params).token;
                let b = joined.sample(&logits(), lse(), &params).token;
                assert_eq!(a, b, "the rank that joined late drew differently");
                a
            })
            .collect();
        assert!(
            next.iter().any(|&t| t != next[0]),
            "the draws should vary (else the test proves nothing): {next:?}"
        );
    }
}
