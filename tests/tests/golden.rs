//! The tensor-parallel forward pass against Hugging Face transformers.
//!
//! For each attention shape (MHA, GQA with 2 KV heads, MQA) and TP size 1, 2 and 4 (each rank its
//! own process, joined by the TCP ring), two prompts of different lengths run as one batch:
//! a prefill, then 16 single-token decode steps through the paged KV cache. Decode steps are
//! teacher-forced with transformers' greedy tokens so every logit row is comparable, and our own
//! argmax must equal transformers' token at every step, which is exactly the condition for free-
//! running greedy decoding to produce the same tokens (checked directly below as well).
//!
//! Every f32 case runs twice: with Caravan's CPU kernels, and with `--cpu-kernels off`, where
//! every product, norm and the paged-KV attention (gathered SDPA) run through libtorch, the
//! device-generic path a GPU takes. The bf16 case also runs with `--cpu-kernels avx2`: on a CPU
//! with AVX-512 BF16, `on` takes that loop for bf16 weights, and `avx2` the loop it replaces.

use std::collections::HashMap;

use caravan_tests::{fixtures, generate, ids, max_abs_diff, read_safetensors, HostTensor};

/// f32 tolerance on every logit (the bound; observed differences are ~4e-6).
const F32_TOLERANCE: f64 = 1e-4;
const PROMPTS: usize = 2;
const DECODE_STEPS: usize = 16;

struct Golden {
    tensors: HashMap<String, HostTensor>,
}

impl Golden {
    fn load(shape: &str) -> Self {
        let path = fixtures().join(shape).join("golden.safetensors");
        Golden {
            tensors: read_safetensors(&path).expect("golden file"),
        }
    }

    fn get(&self, key: &str) -> &HostTensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("golden has no {key}"))
    }

    fn prompt(&self, i: usize) -> Vec<i64> {
        self.get(&format!("p{i}.prompt")).ints.clone()
    }

    fn tokens(&self, i: usize) -> Vec<i64> {
        self.get(&format!("p{i}.tokens")).ints.clone()
    }

    /// Arguments for a teacher-forced run of `prompts` as one batch, dumping logits to `dump`.
    fn teacher_forced_args(
        &self,
        shape: &str,
        tp: usize,
        prompts: &[usize],
        dump: &std::path::Path,
    ) -> Vec<String> {
        let mut args = vec![
            "--model".into(),
            fixtures().join(shape).display().to_string(),
            "--tp".into(),
            tp.to_string(),
            "--max-new-tokens".into(),
            (DECODE_STEPS + 1).to_string(),
            "--dump-logits".into(),
            dump.display().to_string(),
        ];
        for &i in prompts {
            args.extend(["--prompt-ids".into(), ids(&self.prompt(i))]);
            args.extend([
                "--force-tokens".into(),
                ids(&self.tokens(i)[..DECODE_STEPS]),
            ]);
        }
        args
    }
}

/// Which implementation computes on the CPU (`--cpu-kernels`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernels {
    /// Caravan's kernels (where the CPU has AVX2/FMA/F16C), each on the widest loop it has.
    Caravan,
    /// Caravan's kernels on their AVX2/FMA loops only.
    Avx2,
    /// libtorch alone: the device-generic path.
    Libtorch,
}

const BOTH_PATHS: [Kernels; 2] = [Kernels::Caravan, Kernels::Libtorch];

/// Whether this CPU runs Caravan's kernels (AVX2, FMA, F16C).
fn cpu_has_avx2() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("f16c")
}

/// Whether this CPU has AVX-512F and AVX-512 BF16 (what `on` takes for bf16 weights).
fn cpu_has_avx512_bf16() -> bool {
    use std::arch::is_x86_feature_detected as has;
    cpu_has_avx2() && has!("avx512f") && has!("avx512bf16")
}

/// Runs a teacher-forced batch of `prompts` and returns the dumped logits and tokens (their
/// rows keyed by each prompt's index in the golden file).
fn run_prompts(
    shape: &str,
    tp: usize,
    prompts: &[usize],
    kernels: Kernels,
    extra: &[&str],
) -> HashMap<String, HostTensor> {
    let golden = Golden::load(shape);
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.safetensors");
    let mut args = golden.teacher_forced_args(shape, tp, prompts, &dump);
    let switch = match kernels {
        Kernels::Caravan => "on",
        Kernels::Avx2 => "avx2",
        Kernels::Libtorch => "off",
    };
    args.extend(["--cpu-kernels".to_string(), switch.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = generate(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "caravan-generate failed for {shape} tp={tp}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = stdout
        .lines()
        .find_map(|line| line.strip_prefix("cpu kernels: "))
        .unwrap_or_default();
    let took = match kernels {
        Kernels::Libtorch => said == "libtorch (--cpu-kernels off)",
        _ if !cpu_has_avx2() => said == "libtorch (this CPU has no AVX2/FMA/F16C)",
        Kernels::Avx2 => said == "caravan AVX2/FMA (--cpu-kernels avx2)",
        // The widest loop for each dtype, then AVX2/FMA for the rest.
        Kernels::Caravan => {
            said.starts_with("caravan ")
                && said.ends_with("AVX2/FMA")
                && (said.contains("AVX-512 BF16") == cpu_has_avx512_bf16())
        }
    };
    assert!(
        took,
        "the run does not say it took the {kernels:?} path:\n{stdout}"
    );
    let dumped = read_safetensors(&dump).expect("dump");
    // The dump numbers prompts in the order they were given.
    dumped
        .into_iter()
        .map(|(key, tensor)| {
            let (index, part) = key.split_once('.').expect("dump keys are p<i>.<part>");
            let given: usize = index[1..].parse().expect("prompt index");
            (format!("p{}.{part}", prompts[given]), tensor)
        })
        .collect()
}

/// Runs a teacher-forced batch of both prompts.
fn run(shape: &str, tp: usize, kernels: Kernels, extra: &[&str]) -> HashMap<String, HostTensor> {
    let all: Vec<usize> = (0..PROMPTS).collect();
    run_prompts(shape, tp, &all, kernels, extra)
}

/// Asserts that every logit of the prompts in `ours` is within `tolerance` of transformers' and,
/// when `exact_tokens`, that every greedy choice equals transformers'.
fn compare(
    shape: &str,
    ours: &HashMap<String, HostTensor>,
    tolerance: f64,
    exact_tokens: bool,
) -> f64 {
    let golden = Golden::load(shape);
    let mut worst: f64 = 0.0;
    let prompts: Vec<usize> = (0..PROMPTS)
        .filter(|i| ours.contains_key(&format!("p{i}.tokens")))
        .collect();
    assert!(!prompts.is_empty(), "no prompt in the dump");
    for i in prompts {
        for part in ["prefill_logits", "decode_logits"] {
            let key = format!("p{i}.{part}");
            let diff = max_abs_diff(golden.get(&key), &ours[&key]);
            assert!(
                diff <= tolerance,
                "{shape} {key}: max |diff| {diff:.3e} > {tolerance:.0e}"
            );
            worst = worst.max(diff);
        }
        if exact_tokens {
            assert_eq!(
                ours[&format!("p{i}.tokens")].ints,
                golden.tokens(i),
                "{shape} prompt {i} tokens"
            );
        }
    }
    worst
}

fn check_f32(shape: &str, tp: usize) {
    for kernels in BOTH_PATHS {
        let ours = run(shape, tp, kernels, &[]);
        let worst = compare(shape, &ours, F32_TOLERANCE, true);
        eprintln!("{shape} tp={tp} {kernels:?}: max |logit diff| {worst:.2e}");
    }
}

#[test]
fn mha_tp1() {
    check_f32("mha", 1);
}

#[test]
fn mha_tp2() {
    check_f32("mha", 2);
}

#[test]
fn mha_tp4() {
    check_f32("mha", 4);
}

#[test]
fn gqa_tp1_sharded_checkpoint() {
    check_f32("gqa", 1);
}

#[test]
fn gqa_tp2() {
    check_f32("gqa", 2);
}

#[test]
fn gqa_tp4_replicates_kv_heads() {
    check_f32("gqa", 4);
}

#[test]
fn mqa_tp1() {
    check_f32("mqa", 1);
}

#[test]
fn mqa_tp2_replicates_the_kv_head() {
    check_f32("mqa", 2);
}

#[test]
fn mqa_tp4_replicates_the_kv_head() {
    check_f32("mqa", 4);
}

#[test]
fn replicated_vocab_matches_too() {
    let ours = run(
        "mha",
        2,
        Kernels::Caravan,
        &["--vocab-sharding", "replicated"],
    );
    compare("mha", &ours, F32_TOLERANCE, true);
}

/// One sequence alone decodes through the per-sequence SDPA (two or more share one gathered
/// call, which the other cases cover).
#[test]
fn one_sequence_on_the_libtorch_path() {
    for (shape, tp) in [("gqa", 2), ("mqa", 1)] {
        let ours = run_prompts(shape, tp, &[1], Kernels::Libtorch, &[]);
        assert!(!ours.contains_key("p0.tokens"));
        compare(shape, &ours, F32_TOLERANCE, true);
    }
}

/// bf16 compute against the f32 reference. Rounding to bf16 (8 bits of mantissa) moves logits by
/// far more than 1e-4, so the bound is relative to transformers' own bf16 error on the same
/// weights and tokens: ours may be at most twice that, plus 0.02.
#[test]
fn bf16_within_twice_transformers_bf16_error() {
    let golden = Golden::load("gqa");
    if !cpu_has_avx512_bf16() {
        eprintln!("skipped: the AVX-512 BF16 loop (this CPU has no AVX-512 BF16)");
    }
    for kernels in [Kernels::Caravan, Kernels::Avx2, Kernels::Libtorch] {
        let ours = run("gqa", 2, kernels, &["--dtype", "bf16"]);
        check_bf16(&golden, &ours, kernels);
    }
}

fn check_bf16(golden: &Golden, ours: &HashMap<String, HostTensor>, kernels: Kernels) {
    for i in 0..PROMPTS {
        let p = golden.prompt(i).len();
        let f32_all = golden.get(&format!("p{i}.prefill_logits"));
        let hf_bf16 = golden.get(&format!("p{i}.bf16_logits"));
        let vocab = f32_all.shape[1];
        // transformers' bf16 error on the prompt rows.
        let hf_prefill = HostTensor {
            shape: vec![p, vocab],
            floats: hf_bf16.floats[..p * vocab].to_vec(),
            ints: vec![],
        };
        let hf_error = max_abs_diff(f32_all, &hf_prefill);
        let bound = 2.0 * hf_error + 0.02;
        let ours_error = max_abs_diff(f32_all, &ours[&format!("p{i}.prefill_logits")]);
        eprintln!(
            "bf16 {kernels:?} prompt {i}: ours {ours_error:.3e}, transformers {hf_error:.3e}, \
             bound {bound:.3e}"
        );
        assert!(
            ours_error <= bound,
            "{kernels:?} prompt {i}: bf16 error {ours_error:.3e} > {bound:.3e}"
        );
        let decode_error = max_abs_diff(
            golden.get(&format!("p{i}.decode_logits")),
            &ours[&format!("p{i}.decode_logits")],
        );
        assert!(
            decode_error <= bound,
            "{kernels:?} prompt {i}: bf16 decode error {decode_error:.3e} > {bound:.3e}"
        );
    }
}

/// Free-running greedy generation (no teacher forcing, no dump) prints transformers' tokens.
#[test]
fn free_running_greedy_equals_transformers_generate() {
    let golden = Golden::load("gqa");
    let mut args = vec![
        "--model".into(),
        fixtures().join("gqa").display().to_string(),
        "--tp".into(),
        "2".into(),
        "--max-new-tokens".into(),
        (DECODE_STEPS + 1).to_string(),
    ];
    for i in 0..PROMPTS {
        args.extend(["--prompt-ids".into(), ids(&golden.prompt(i))]);
    }
    let out = generate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for i in 0..PROMPTS {
        let expected = format!("prompt {i}: generated {:?}", golden.tokens(i));
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("tok/s"), "no speed report in:\n{stdout}");
}
