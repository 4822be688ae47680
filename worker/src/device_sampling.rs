//! Choosing tokens where the logits lie (a GPU, or libtorch on the CPU with `--cpu-kernels off`):
//! greedy picks, temperature / top-k / top-p draws, the chosen token's log-probability, the top
//! alternatives and prompt tokens' scores, for a whole step's rows in a few batched calls, so
//! that only the chosen ids and the requested log-probabilities cross to the host (a row of
//! logits is the vocabulary's 32,000 floats; an id is 8 bytes).
//!
//! Each function gives what its host counterpart in [`crate::sampling`] gives for the same row:
//! the same order (descending, ties by token id), the same top-k set and top-p nucleus, and the
//! same uniform draw from the sequence's stream, made on the host by
//! [`crate::sampling::SequenceSampler::next_uniform`]. The two paths therefore choose the same
//! tokens (the tests below compare them), and every rank, running the same calls on identical
//! logits, chooses alike. Rows whose logits change before the choice (penalties, bias,
//! `min_tokens`, a structured-output mask) stay on the host path.

use tch::{Device, Kind, TchError, Tensor};

use crate::sampling::{Sampled, Score};

/// One row of a step's logits to choose a token from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceDraw {
    /// The row in the step's logits.
    pub row: i64,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// The sequence's uniform draw in [0, 1) for this token; unused when greedy.
    pub uniform: f64,
    /// Alternatives to report.
    pub top_logprobs: usize,
}

/// Chooses a token for each of `draws` from `logits` (`[rows, vocab]`, any float kind, on any
/// device) whose rows' `ln Σ exp` is `log_sum_exp` (`[rows]`). Answers in the order of `draws`.
pub fn sample(
    logits: &Tensor,
    log_sum_exp: &Tensor,
    draws: &[DeviceDraw],
) -> Result<Vec<Sampled>, TchError> {
    if draws.is_empty() {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let (scores, lse) = select_rows(logits, log_sum_exp, draws.iter().map(|d| d.row))?;
    // argmax answers the first of equal maxima, as the host's does.
    let mut tokens = scores.f_argmax(-1, false)?;
    let drawn: Vec<usize> = (0..draws.len())
        .filter(|&i| draws[i].temperature > 0.0)
        .collect();
    if !drawn.is_empty() {
        let which = ids(drawn.iter().map(|&i| i as i64), device)?;
        let chosen = draw(
            &scores.f_index_select(0, &which)?,
            &drawn.iter().map(|&i| draws[i]).collect::<Vec<_>>(),
        )?;
        tokens = tokens.f_index_copy(0, &which, &chosen)?;
    }
    let logprobs = scores
        .f_gather(1, &tokens.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?
        .f_sub(&lse)?;
    let n = draws.iter().map(|d| d.top_logprobs).max().unwrap_or(0);
    let top = (n > 0).then(|| top_n(&scores, &lse, n)).transpose()?;
    let tokens = to_host::<i64>(&tokens)?;
    let logprobs = to_host::<f32>(&logprobs)?;
    let mut out = Vec::with_capacity(draws.len());
    for (i, d) in draws.iter().enumerate() {
        out.push(Sampled {
            token: tokens[i],
            logprob: logprobs[i],
            top_logprobs: top
                .as_ref()
                .map(|t| t.row(i, d.top_logprobs))
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Scores known tokens: row `rows[i]` of `logits` for the token `targets[i]`, with the row's `n`
/// most likely alternatives; [`crate::sampling::score`] for many rows at once (prompt
/// log-probabilities).
pub fn score(
    logits: &Tensor,
    log_sum_exp: &Tensor,
    rows: &[i64],
    targets: &[i64],
    n: usize,
) -> Result<Vec<Score>, TchError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let (scores, lse) = select_rows(logits, log_sum_exp, rows.iter().copied())?;
    let vocab = scores.size2()?.1;
    // A token outside the vocabulary has no score: log-probability -inf, ranked last.
    let valid: Vec<bool> = targets.iter().map(|&t| (0..vocab).contains(&t)).collect();
    let targets = ids(targets.iter().map(|&t| t.clamp(0, vocab - 1)), device)?;
    let own = scores.f_gather(1, &targets.f_unsqueeze(1)?, false)?;
    let ranks = scores
        .f_ge_tensor(&own)?
        .f_sum_dim_intlist(-1, false, Kind::Int64)?;
    let logprobs = own.f_squeeze_dim(1)?.f_sub(&lse)?;
    let top = (n > 0).then(|| top_n(&scores, &lse, n)).transpose()?;
    let ranks = to_host::<i64>(&ranks)?;
    let logprobs = to_host::<f32>(&logprobs)?;
    Ok((0..rows.len())
        .map(|i| Score {
            logprob: if valid[i] {
                logprobs[i]
            } else {
                f32::NEG_INFINITY
            },
            rank: if valid[i] { ranks[i] } else { vocab } as u32,
            top: top.as_ref().map(|t| t.row(i, n)).unwrap_or_default(),
        })
        .collect())
}

/// The draws of rows with a temperature: softmax(scores / T) over the top-k, cut to the top-p
/// nucleus, and the first token whose cumulative probability exceeds the row's uniform draw, as
/// the host's `SequenceSampler::draw` does (in f64, over the scores in descending order).
fn draw(scores: &Tensor, draws: &[DeviceDraw]) -> Result<Tensor, TchError> {
    let device = scores.device();
    let (rows, vocab) = scores.size2()?;
    let column = |values: Vec<f64>, kind: Kind| -> Result<Tensor, TchError> {
        Tensor::from_slice(&values)
            .f_to_kind(kind)?
            .f_to_device(device)?
            .f_view([rows, 1])
    };
    let temperature = column(
        draws.iter().map(|d| d.temperature as f64).collect(),
        Kind::Float,
    )?;
    let k = ids(
        draws.iter().map(|d| match d.top_k {
            0 => vocab,
            k => (k as i64).min(vocab),
        }),
        device,
    )?
    .f_view([rows, 1])?;
    let top_p = column(draws.iter().map(|d| d.top_p as f64).collect(), Kind::Double)?;
    let uniform = column(draws.iter().map(|d| d.uniform).collect(), Kind::Double)?;

    let (sorted, order) = scores.f_sort_stable(true, -1, true)?;
    let position = Tensor::f_arange(vocab, (Kind::Int64, device))?.f_view([1, vocab])?;
    let in_top_k = position.f_lt_tensor(&k)?;
    let weights = sorted
        .f_sub(&sorted.f_narrow(1, 0, 1)?)?
        .f_div(&temperature)?
        .f_to_kind(Kind::Double)?
        .f_exp()?
        .f_mul(&in_top_k.f_to_kind(Kind::Double)?)?;
    let cumulative = weights.f_cumsum(-1, Kind::Double)?;
    let total = cumulative.f_gather(1, &k.f_sub_scalar(1)?, false)?;
    let cumulative = cumulative.f_div(&total)?;
    // The nucleus: up to and including the first token whose cumulative mass reaches top_p.
    let nucleus = cumulative
        .f_lt_tensor(&top_p)?
        .f_sum_dim_intlist(-1, true, Kind::Int64)?
        .f_add_scalar(1)?
        .f_minimum(&k)?;
    let keep = nucleus.f_where_self(&top_p.f_lt(1.0)?, &k)?;
    let last_kept = keep.f_sub_scalar(1)?;
    let kept_mass = cumulative.f_gather(1, &last_kept, false)?;
    let below = cumulative
        .f_le_tensor(&uniform.f_mul(&kept_mass)?)?
        .f_logical_and(&position.f_lt_tensor(&keep)?)?
        .f_sum_dim_intlist(-1, true, Kind::Int64)?
        .f_minimum(&last_kept)?;
    order.f_gather(1, &below, false)?.f_squeeze_dim(1)
}

/// Each row's `n` largest scores as log-probabilities with their token ids, largest first and
/// equal ones by id, on the host.
struct TopN {
    n: usize,
    ids: Vec<i64>,
    logprobs: Vec<f32>,
}

impl TopN {
    fn row(&self, i: usize, n: usize) -> Vec<(i64, f32)> {
        let at = i * self.n;
        (at..at + n.min(self.n))
            .map(|j| (self.ids[j], self.logprobs[j]))
            .collect()
    }
}

/// The `n` largest of each row: `topk` finds the n-th value; every larger one and the first
/// (by id) of the equal ones make exactly `n`, then sorted stably by value.
fn top_n(scores: &Tensor, log_sum_exp: &Tensor, n: usize) -> Result<TopN, TchError> {
    let (rows, vocab) = scores.size2()?;
    let n = (n as i64).min(vocab);
    let (largest, _) = scores.f_topk(n, -1, true, true)?;
    let nth = largest.f_narrow(1, n - 1, 1)?;
    let above = scores.f_gt_tensor(&nth)?;
    let equal = scores.f_eq_tensor(&nth)?;
    let room = above
        .f_sum_dim_intlist(-1, true, Kind::Int64)?
        .f_neg()?
        .f_add_scalar(n)?;
    let first_equal = equal
        .f_cumsum(-1, Kind::Int64)?
        .f_le_tensor(&room)?
        .f_logical_and(&equal)?;
    let chosen = above.f_logical_or(&first_equal)?;
    // Row-major: each row's ids ascending; exactly n per row (a NaN row errs here).
    let ids = chosen.f_nonzero()?.f_select(1, 1)?.f_view([rows, n])?;
    let values = scores.f_gather(1, &ids, false)?;
    let (values, order) = values.f_sort_stable(true, -1, true)?;
    let ids = ids.f_gather(1, &order, false)?;
    let logprobs = values.f_sub(&log_sum_exp.f_unsqueeze(1)?)?;
    Ok(TopN {
        n: n as usize,
        ids: to_host::<i64>(&ids)?,
        logprobs: to_host::<f32>(&logprobs)?,
    })
}

/// Rows `rows` of `logits` and of `log_sum_exp`, in f32, where they lie.
pub(crate) fn select_rows(
    logits: &Tensor,
    log_sum_exp: &Tensor,
    rows: impl Iterator<Item = i64>,
) -> Result<(Tensor, Tensor), TchError> {
    let index = ids(rows, logits.device())?;
    Ok((
        logits.f_index_select(0, &index)?.f_to_kind(Kind::Float)?,
        log_sum_exp
            .f_index_select(0, &index)?
            .f_to_kind(Kind::Float)?,
    ))
}

/// A 1-D int64 tensor of `values` on `device`.
fn ids(values: impl Iterator<Item = i64>, device: Device) -> Result<Tensor, TchError> {
    Tensor::from_slice(&values.collect::<Vec<_>>()).f_to_device(device)
}

/// A tensor's elements on the host, in row-major order.
pub(crate) fn to_host<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>, TchError> {
    Vec::<T>::try_from(
        t.f_to_device(Device::Cpu)?
            .f_to_kind(T::KIND)?
            .f_contiguous()?
            .f_flatten(0, -1)?,
    )
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::sampling::{self, log_sum_exp, SamplingParams, SequenceSampler};

    /// Rows of logits with many exact ties (values on a coarse grid), as bf16 logits have.
    fn rows(count: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| {
                (0..vocab)
                    .map(|_| (rng.random_range(-40..40) as f32) * 0.125)
                    .collect()
            })
            .collect()
    }

    fn tensor(rows: &[Vec<f32>]) -> (Tensor, Tensor) {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_slice(&flat).view([rows.len() as i64, -1]);
        let lse = t.logsumexp([-1i64].as_slice(), false);
        (t, lse)
    }

    /// Every combination of the settings the device path takes, each row with its own seed and
    /// position in its stream: the device's choice equals the host sampler's.
    #[test]
    fn draws_equal_the_host_samplers_token_for_token() {
        let vocab = 300;
        let logits = rows(24, vocab, 1);
        let (t, lse) = tensor(&logits);
        let lse_host: Vec<f32> = Vec::try_from(&lse).unwrap();
        let mut settings = Vec::new();
        for temperature in [0.0, 0.3, 1.0, 2.5] {
            for top_k in [0, 1, 7, 40, 1000] {
                for top_p in [1.0, 0.95, 0.5, 0.01] {
                    settings.push((temperature, top_k, top_p));
                }
            }
        }
        let mut mismatches = Vec::new();
        for (case, &(temperature, top_k, top_p)) in settings.iter().enumerate() {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                top_logprobs: case % 4,
                ..SamplingParams::default()
            };
            let mut draws = Vec::new();
            let mut expected = Vec::new();
            for (row, logits) in logits.iter().enumerate() {
                let seed = (case * 100 + row) as u64;
                let mut host = SequenceSampler::new(seed, 3);
                let mut device = host.clone();
                // Somewhere along the stream, not only at its start.
                for _ in 0..row % 5 {
                    host.record(0);
                    device.record(0);
                }
                expected.push(host.sample(logits, lse_host[row], &params));
                draws.push(DeviceDraw {
                    row: row as i64,
                    temperature,
                    top_k,
                    top_p,
                    uniform: device.next_uniform(),
                    top_logprobs: params.top_logprobs,
                });
            }
            let got = sample(&t, &lse, &draws).unwrap();
            for (row, (g, e)) in got.iter().zip(&expected).enumerate() {
                let same_top = g.top_logprobs.len() == e.top_logprobs.len()
                    && g.top_logprobs
                        .iter()
                        .zip(&e.top_logprobs)
                        .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-5);
                if g.token != e.token || (g.logprob - e.logprob).abs() > 1e-5 || !same_top {
                    mismatches.push(format!(
                        "T {temperature} top_k {top_k} top_p {top_p} row {row}: {g:?} vs {e:?}"
                    ));
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "{}",
            mismatches[..mismatches.len().min(5)].join("\n")
        );
    }

    #[test]
    fn draws_follow_the_distribution_and_stay_in_the_nucleus() {
        // Three likely tokens (0.5, 0.3, 0.2 at T 1) among unlikely ones.
        let mut row = vec![-30.0f32; 50];
        row[7] = 0.5f32.ln();
        row[3] = 0.3f32.ln();
        row[40] = 0.2f32.ln();
        let (t, lse) = tensor(&[row]);
        let mut counts = std::collections::HashMap::new();
        let mut sampler = SequenceSampler::new(11, 0);
        let trials = 4000;
        for _ in 0..trials {
            let d = DeviceDraw {
                row: 0,
                temperature: 1.0,
                top_k: 0,
                top_p: 0.75,
                uniform: sampler.next_uniform(),
                top_logprobs: 0,
            };
            let token = sample(&t, &lse, &[d]).unwrap()[0].token;
            sampler.record(token);
            *counts.entry(token).or_insert(0usize) += 1;
        }
        // top_p 0.75 keeps tokens 7 and 3 (0.5 + 0.3), renormalised to 0.625 / 0.375.
        assert_eq!(counts.len(), 2, "{counts:?}");
        let share = counts[&7] as f64 / trials as f64;
        assert!((share - 0.625).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn scores_equal_the_host_scores_with_ties_and_foreign_tokens() {
        let vocab = 200;
        let logits = rows(9, vocab, 2);
        let (t, lse) = tensor(&logits);
        let rows: Vec<i64> = vec![0, 3, 3, 8, 5, 1];
        let targets: Vec<i64> = vec![4, 0, 199, 17, 200, -1];
        for n in [0, 1, 5, 250] {
            let got = score(&t, &lse, &rows, &targets, n).unwrap();
            for ((g, &r), &target) in got.iter().zip(&rows).zip(&targets) {
                let row = &logits[r as usize];
                let e = sampling::score(row, log_sum_exp(row), target, n);
                assert_eq!(g.rank, e.rank, "row {r} target {target}");
                assert!(
                    g.logprob == e.logprob || (g.logprob - e.logprob).abs() < 1e-5,
                    "row {r} target {target}: {} vs {}",
                    g.logprob,
                    e.logprob
                );
                let ids = |s: &Score| s.top.iter().map(|x| x.0).collect::<Vec<_>>();
                assert_eq!(ids(g), ids(&e), "row {r} n {n}");
            }
        }
    }

    #[test]
    fn nothing_to_do_is_no_call() {
        let (t, lse) = tensor(&rows(1, 10, 3));
        assert!(sample(&t, &lse, &[]).unwrap().is_empty());
        assert!(score(&t, &lse, &[], &[], 3).unwrap().is_empty());
    }
}
