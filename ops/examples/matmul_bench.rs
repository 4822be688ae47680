//! Times one forward pass's weight products (the bench-150m shapes) through `cpu::packed` and
//! through libtorch, for 1 to 512 rows of activations (decode steps to prefill chunks), and
//! prints GB/s of weights read and GFLOP/s.
//!
//! `cargo run --release -p caravan-ops --example matmul_bench -- [THREADS] [bf16|f16|f32]`

use std::time::Instant;

use caravan_ops::cpu::{self, packed::PackedWeight};
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
    if std::env::var_os("MATMUL_BENCH_CACHED").is_some() {
        // Compute only: every product reads the same cache-resident 128-row weight.
        shapes.iter_mut().for_each(|s| *s = (128, 1024));
    }
    if std::env::var_os("MATMUL_BENCH_TINY").is_some() {
        // Fixed costs only: the same number of calls on 16-row weights.
        shapes.iter_mut().for_each(|s| *s = (16, s.1));
    }
    let cached = std::env::var_os("MATMUL_BENCH_CACHED").is_some();
    let first = Tensor::randn([shapes[0].0, shapes[0].1], (Kind::Float, Device::Cpu)).to_kind(kind);
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|&(n, k)| match cached {
            true => first.shallow_clone(),
            false => Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(kind),
        })
        .collect();
    // Caravan's layers hold packed weights; cached mode packs the one shared weight once.
    let packed: Vec<PackedWeight> = match cached {
        true => vec![PackedWeight::pack(&first)?.expect("this CPU runs the kernel")],
        false => weights
            .iter()
            .map(|w| Ok(PackedWeight::pack(w)?.expect("this CPU runs the kernel")))
            .collect::<caravan_ops::Result<_>>()?,
    };
    let packed_for = |i: usize| &packed[if cached { 0 } else { i }];
    let bytes: i64 = weights
        .iter()
        .map(|w| (w.numel() * w.kind().elt_size_in_bytes()) as i64)
        .sum();
    let macs: i64 = weights.iter().map(|w| w.numel() as i64).sum();
    println!(
        "{threads} thread(s), {kind:?}, {:.0} MB of weights per pass",
        bytes as f64 / 1e6
    );
    println!("rows | ours ms | ours GB/s | ours GFLOP/s | libtorch ms | libtorch GFLOP/s");
    for m in [1, 2, 4, 8, 16, 32, 64, 128, 512] {
        let xs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, k)| Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(kind))
            .collect();
        let time = |ours: bool| -> caravan_ops::Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..if m > 64 { 2 } else { 5 } {
                let start = Instant::now();
                for (i, (x, w)) in xs.iter().zip(&weights).enumerate() {
                    let _ = match ours {
                        true => packed_for(i).linear(x)?,
                        false => x.f_linear::<Tensor>(w, None)?,
                    };
                }
                best = best.min(start.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let (ours, torch) = (time(true)?, time(false)?);
        let gflops = |t: f64| 2.0 * (macs * m) as f64 / t / 1e9;
        println!(
            "{m:4} | {:7.2} | {:9.1} | {:12.1} | {:11.2} | {:16.1}",
            ours * 1e3,
            bytes as f64 / ours / 1e9,
            gflops(ours),
            torch * 1e3,
            gflops(torch)
        );
    }
    Ok(())
}
