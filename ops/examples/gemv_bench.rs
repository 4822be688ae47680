//! Times one decode token's weight products (the bench-150m shapes) through `cpu::gemv` and
//! through libtorch, for 1 to 16 rows of activations, and prints GB/s of weights read.
//!
//! `cargo run --release -p caravan-ops --example gemv_bench -- [THREADS] [bf16|f16|f32]`

use std::time::Instant;

use caravan_ops::cpu;
use tch::{Device, Kind, Tensor};

fn main() -> caravan_ops::Result<()> {
    // As the worker runs: libtorch's OpenMP threads passive (see `restart_with_passive_openmp`).
    if let Err(e) = cpu::restart_with_passive_openmp() {
        eprintln!("running with spinning OpenMP threads: {e}");
    }
    let mut args = std::env::args().skip(1);
    let threads: usize = args
        .next()
        .map_or(2, |a| a.parse().expect("THREADS is a number"));
    let kind = match args.next().as_deref() {
        Some("bf16") => Kind::BFloat16,
        Some("f16") => Kind::Half,
        _ => Kind::Float,
    };
    cpu::set_threads(threads)?;
    // bench-150m: hidden 1024, 4 KV heads of 64, MLP 2816, 8 layers, vocab 32000.
    let mut shapes = Vec::new();
    for _ in 0..8 {
        shapes.extend([(1024, 1024), (256, 1024), (256, 1024), (1024, 1024)]);
        shapes.extend([(2816, 1024), (2816, 1024), (1024, 2816)]);
    }
    shapes.push((32000, 1024));
    if std::env::var_os("GEMV_BENCH_CACHED").is_some() {
        // Compute only: every product reads the same cache-resident 128-row weight.
        shapes.iter_mut().for_each(|s| *s = (128, 1024));
    }
    if std::env::var_os("GEMV_BENCH_TINY").is_some() {
        // Fixed costs only: the same number of calls on 16-row weights.
        shapes.iter_mut().for_each(|s| *s = (16, s.1));
    }
    let cached = std::env::var_os("GEMV_BENCH_CACHED").is_some();
    let first = Tensor::randn([shapes[0].0, shapes[0].1], (Kind::Float, Device::Cpu)).to_kind(kind);
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|&(n, k)| match cached {
            true => first.shallow_clone(),
            false => Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(kind),
        })
        .collect();
    let bytes: i64 = weights
        .iter()
        .map(|w| w.numel() as i64 * w.kind().elt_size_in_bytes() as i64)
        .sum();
    println!(
        "{threads} thread(s), {kind:?}, {:.0} MB of weights per pass",
        bytes as f64 / 1e6
    );
    println!("rows | ours ms | ours GB/s | libtorch ms | libtorch GB/s");
    for m in [1, 2, 4, 8, 16, 32, 64, 128] {
        let xs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, k)| Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(kind))
            .collect();
        let time = |ours: bool| -> caravan_ops::Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let start = Instant::now();
                for (x, w) in xs.iter().zip(&weights) {
                    let y = if ours { cpu::gemv::linear(x, w)? } else { None };
                    let _ = y.unwrap_or_else(|| x.linear::<Tensor>(w, None));
                }
                best = best.min(start.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let (ours, torch) = (time(true)?, time(false)?);
        let gbs = |t: f64| bytes as f64 / t / 1e9;
        let note = if m > cpu::gemv::MAX_F32_ROWS && kind == Kind::Float {
            " (above MAX_F32_ROWS: libtorch both)"
        } else {
            ""
        };
        println!(
            "{m:4} | {:7.2} | {:9.1} | {:11.2} | {:13.1}{note}",
            ours * 1e3,
            gbs(ours),
            torch * 1e3,
            gbs(torch)
        );
    }
    Ok(())
}
