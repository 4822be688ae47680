//! A bad checkpoint or a bad request gives one line naming the problem, on one process or many.

use caravan_tests::{fixtures, generate};

/// Runs `caravan-generate` expecting failure; returns its stderr, which must be one line.
fn expect_error(model: &str, tp: usize, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec![
        "--model".into(),
        fixtures().join(model).display().to_string(),
        "--tp".into(),
        tp.to_string(),
        "--max-new-tokens".into(),
        "2".into(),
        "--prompt-ids".into(),
        "1,15043,3186".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = generate(&args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success(),
        "expected a failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean exit, not a crash: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line, got:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn missing_tensor_is_named() {
    for tp in [1, 2] {
        let err = expect_error("bad-missing", tp, &[]);
        assert!(
            err.contains("missing weight model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }
}

#[test]
fn misshapen_tensor_is_named_with_both_shapes() {
    for tp in [1, 2] {
        let err = expect_error("bad-shape", tp, &[]);
        assert!(
            err.contains(
                "model.layers.0.self_attn.k_proj.weight has shape [48, 128], expected [128, 128]"
            ),
            "{err}"
        );
    }
}

#[test]
fn heads_not_divisible_by_tp() {
    let err = expect_error("mha", 3, &[]);
    assert!(
        err.contains("num_attention_heads 8 is not divisible by the tensor-parallel size 3"),
        "{err}"
    );
}

#[test]
fn token_outside_vocabulary_is_an_error_not_a_crash() {
    let err = expect_error("mha", 1, &["--prompt-ids", "1,32000"]);
    assert!(
        err.contains("token id 32000 is outside the vocabulary"),
        "{err}"
    );
}

#[test]
fn missing_checkpoint_folder() {
    let err = expect_error("does-not-exist", 1, &[]);
    assert!(err.contains("does-not-exist"), "{err}");
}

#[test]
fn gpu_request_without_a_usable_gpu_is_an_error() {
    // CI machines have no GPU; where one is present and the build has CUDA, this test is moot.
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let err = expect_error("mha", 1, &["--device", "cuda:0"]);
    assert!(err.starts_with("error: --device cuda:0: "), "{err}");
    assert!(
        err.contains("--features cuda") || err.contains("libtorch sees no GPU"),
        "{err}"
    );
    let err = expect_error("mha", 2, &["--collective", "nccl"]);
    assert!(err.contains("needs a build with --features cuda"), "{err}");
}
