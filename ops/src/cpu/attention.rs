//! Decode attention on the CPU: each single-token sequence's query heads attend over its cached
//! keys and values where they lie in the paged pool, with no gather, no repeated KV heads and one
//! output allocation per layer (libtorch's path copies the context twice and dispatches ~10 ops).

use tch::{Device, Kind, Tensor};

use crate::Result;

/// One decoding sequence: the row of its query in `q`, and the cache slots of its context
/// (positions `0..context.len()`, the new token's included).
pub struct Decode<'a> {
    pub row: usize,
    pub context: &'a [i64],
}

/// `softmax(q k^T / sqrt(head_dim)) v` per query head for each of `sequences`, grouped-query
/// heads sharing their KV head: `[sequences.len(), q_heads * head_dim]` in `q`'s dtype, or `None`
/// where this path does not apply (not CPU, other dtypes, a head size not a multiple of 8, no
/// AVX2), for libtorch.
///
/// `q` is `[n, q_heads, head_dim]`, `keys` and `values` the layer's pool
/// (`[slots, kv_heads, head_dim]`). Scores, softmax and the weighted sum are f32; a sequence's
/// result does not depend on the others in the step.
pub fn decode(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    sequences: &[Decode],
) -> Result<Option<Tensor>> {
    let (qs, ks) = (q.size(), keys.size());
    let applies = super::kernels_run_here()
        && !sequences.is_empty()
        && qs.len() == 3
        && ks.len() == 3
        && values.size() == ks
        && [q, keys, values]
            .iter()
            .all(|t| t.device() == Device::Cpu && t.kind() == q.kind())
        && matches!(q.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        && keys.is_contiguous()
        && values.is_contiguous()
        && qs[2] == ks[2]
        && qs[2] > 0
        && qs[2] % 8 == 0
        && ks[1] > 0
        && qs[1] > 0
        && qs[1] % ks[1] == 0;
    if !applies {
        return Ok(None);
    }
    let slots = ks[0];
    for seq in sequences {
        if seq.row as i64 >= qs[0] || seq.context.iter().any(|&s| s < 0 || s >= slots) {
            return Err(crate::Error::InvalidBatch(format!(
                "decode attention: row {} of {} or a context slot outside 0..{slots}",
                seq.row, qs[0]
            )));
        }
        if seq.context.is_empty() {
            return Err(crate::Error::InvalidBatch(
                "decode attention over an empty context".into(),
            ));
        }
    }
    let q = q.f_contiguous()?;
    let mut out = Tensor::f_empty(
        [sequences.len() as i64, qs[1] * qs[2]],
        (q.kind(), Device::Cpu),
    )?;
    match q.kind() {
        Kind::Float => imp::decode::<f32>(&q, keys, values, sequences, &mut out),
        Kind::BFloat16 => imp::decode::<half::bf16>(&q, keys, values, sequences, &mut out),
        _ => imp::decode::<half::f16>(&q, keys, values, sequences, &mut out),
    }
    Ok(Some(out))
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use tch::Tensor;

    use super::Decode;
    use crate::cpu::{
        elements, elements_mut, team,
        x86::{self, Element},
    };

    /// A sequence, a KV head, and where its query heads' outputs go.
    type Task<'a, W> = (usize, usize, &'a mut [W]);

    /// One task per (sequence, KV head): its query heads.
    pub fn decode<W: Element>(
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        sequences: &[Decode],
        out: &mut Tensor,
    ) {
        let (q_heads, dim) = (q.size()[1] as usize, q.size()[2] as usize);
        let kv_heads = keys.size()[1] as usize;
        let group = q_heads / kv_heads;
        let scale = 1.0 / (dim as f32).sqrt();
        let (q, keys, values) = (elements::<W>(q), elements::<W>(keys), elements::<W>(values));
        let mut tasks: Vec<Task<W>> = elements_mut::<W>(out)
            .chunks_mut(group * dim)
            .enumerate()
            .map(|(i, out)| (i / kv_heads, i % kv_heads, out))
            .collect();
        let run = |tasks: &mut [Task<W>]| {
            let mut scores = Vec::new();
            let (mut key_rows, mut value_rows) = (Vec::new(), Vec::new());
            let (mut query, mut head_out) = (vec![0f32; dim], vec![0f32; dim]);
            for (j, g, out) in tasks.iter_mut() {
                let seq = &sequences[*j];
                let at = |slot: i64| (slot as usize * kv_heads + *g) * dim;
                key_rows.clear();
                key_rows.extend(seq.context.iter().map(|&s| keys[at(s)..].as_ptr()));
                value_rows.clear();
                value_rows.extend(seq.context.iter().map(|&s| values[at(s)..].as_ptr()));
                scores.resize(seq.context.len(), 0f32);
                for h in 0..group {
                    let head = *g * group + h;
                    let row = &q[(seq.row * q_heads + head) * dim..][..dim];
                    query.iter_mut().zip(row).for_each(|(a, b)| *a = b.to_f32());
                    // SAFETY: `kernels_run_here()` was checked; `dim` is a multiple of 8 and every
                    // row pointer starts a head's `dim` values inside the pool (slots checked).
                    unsafe {
                        x86::attend_one(
                            &query,
                            &key_rows,
                            &value_rows,
                            scale,
                            &mut scores,
                            &mut head_out,
                        )
                    };
                    for (o, &v) in out[h * dim..(h + 1) * dim].iter_mut().zip(&head_out) {
                        *o = W::from_f32(v);
                    }
                }
            }
        };
        let Some(team) = team().filter(|_| tasks.len() > 1) else {
            return run(&mut tasks);
        };
        // Runs of tasks, about four per thread, claimed by whichever thread is free; each run
        // goes through a mutex that only the thread that claimed it locks.
        let grain = tasks.len().div_ceil(4 * team.threads());
        let runs: Vec<std::sync::Mutex<&mut [Task<W>]>> =
            tasks.chunks_mut(grain).map(std::sync::Mutex::new).collect();
        team.share(runs.len(), 1, &|claimed| {
            for run_of_tasks in &runs[claimed] {
                run(&mut run_of_tasks.lock().unwrap_or_else(|e| e.into_inner()));
            }
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use tch::Tensor;

    pub fn decode<W>(_: &Tensor, _: &Tensor, _: &Tensor, _: &[super::Decode], _: &mut Tensor) {
        unreachable!("decode() is not called without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::tests::{kernels_run_here, random};

    /// Against libtorch's SDPA over the gathered context, with grouped heads, ragged contexts
    /// scattered through the pool, every dtype, on one and two threads.
    #[test]
    fn matches_sdpa_over_the_gathered_context() {
        if !kernels_run_here() {
            return;
        }
        tch::manual_seed(2);
        let slots = 64;
        // Contexts of 1, 5 and 8 positions and of 43 (five runs of eight and three more).
        let contexts: Vec<Vec<i64>> = vec![
            vec![5],
            (0..43).map(|i| (i * 7) % slots).collect(),
            vec![63, 0, 31, 2, 17],
            (10..18).collect(),
        ];
        let _threads = crate::cpu::tests::THREADS.lock();
        // Grouped (Llama-2-70B's 8:1 among them) and plain multi-head attention.
        // Head sizes of 16, 128 (Llama 2's) and 136 (the weighted sum in runs of 64 and one of 8).
        for (threads, (q_heads, kv_heads), dim) in [
            (1, (8, 2), 16),
            (2, (8, 2), 128),
            (2, (8, 1), 136),
            (2, (4, 4), 16),
        ] {
            crate::cpu::set_threads(threads).unwrap();
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let q = random(&[5, q_heads, dim], kind);
                let keys = random(&[slots, kv_heads, dim], kind);
                let values = random(&[slots, kv_heads, dim], kind);
                let sequences: Vec<Decode> = contexts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Decode {
                        row: 4 - i,
                        context: c,
                    })
                    .collect();
                let ours = decode(&q, &keys, &values, &sequences)
                    .unwrap()
                    .expect("applies");
                assert_eq!(ours.size(), [4, q_heads * dim]);
                assert_eq!(ours.kind(), kind);
                for (i, seq) in sequences.iter().enumerate() {
                    let index = Tensor::from_slice(seq.context);
                    let gather = |pool: &Tensor| {
                        pool.to_kind(Kind::Float)
                            .index_select(0, &index)
                            .transpose(0, 1)
                            .repeat_interleave_self_int(q_heads / kv_heads, 0, None)
                    };
                    let query = q
                        .to_kind(Kind::Float)
                        .narrow(0, seq.row as i64, 1)
                        .transpose(0, 1);
                    let want = Tensor::scaled_dot_product_attention(
                        &query,
                        &gather(&keys),
                        &gather(&values),
                        None::<Tensor>,
                        0.0,
                        false,
                        None,
                        false,
                    )
                    .reshape([1, -1]);
                    let got = ours.narrow(0, i as i64, 1).to_kind(Kind::Float);
                    let diff = (got - &want).abs().max().double_value(&[]);
                    let tolerance = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                    assert!(
                        diff <= tolerance,
                        "{kind:?} dim {dim} heads {q_heads}:{kv_heads} sequence {i}: off by {diff}"
                    );
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    #[test]
    fn refuses_slots_outside_the_pool_and_declines_odd_head_sizes() {
        if !kernels_run_here() {
            return;
        }
        let q = random(&[1, 4, 8], Kind::Float);
        let pool = random(&[10, 2, 8], Kind::Float);
        let outside = [Decode {
            row: 0,
            context: &[3, 10],
        }];
        assert!(decode(&q, &pool, &pool, &outside).is_err());
        let empty = [Decode {
            row: 0,
            context: &[],
        }];
        assert!(decode(&q, &pool, &pool, &empty).is_err());
        let (q6, pool6) = (
            random(&[1, 4, 6], Kind::Float),
            random(&[10, 2, 6], Kind::Float),
        );
        let fine = [Decode {
            row: 0,
            context: &[1],
        }];
        assert!(decode(&q6, &pool6, &pool6, &fine).unwrap().is_none());
    }
}
