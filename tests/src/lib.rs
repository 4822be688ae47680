//! Shared harness for Caravan's end-to-end tests: real processes, real TCP collectives, golden
//! outputs from Hugging Face transformers.
//!
//! [`fixtures`] runs `python/make_fixtures.py` in the project virtualenv (once; it is keyed by a
//! hash of the script) and [`binary`] builds the workspace's binaries with the same cargo and
//! profile as the running test, so `cargo test` alone always exercises fresh code.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `f` while holding an exclusive lock on `name` in the target directory, so that test
/// binaries running in parallel (nextest) do set-up once.
fn with_lock<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let dir = target_dir();
    std::fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(name))?;
    lock.lock()?;
    let result = f();
    lock.unlock()?;
    result
}

/// `target/<profile>` of the running test binary (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    profile_dir().parent().expect("target").to_path_buf()
}

/// The folder of generated checkpoints and golden outputs, generating it if needed.
pub fn fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("fixtures");
        let python = root.join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/setup.sh (or scripts/test.sh) first",
            python.display()
        );
        with_lock("fixtures.lock", || {
            let status = Command::new(&python)
                .arg(root.join("python/make_fixtures.py"))
                .arg("--out")
                .arg(&out)
                .status()
                .context("running make_fixtures.py")?;
            if !status.success() {
                bail!("make_fixtures.py failed: {status}");
            }
            Ok(())
        })
        .expect("generating fixtures");
        out
    })
    .clone()
}

/// `fixtures/serving`: a checkpoint with the real Llama 2 tokenizer (what the coordinator
/// serves), built by the same scripts as the Python API tests, once.
pub fn serving_fixture() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let python = root.join(".venv/bin/python");
        let tokenizer = root.join("fixtures/serving-tokenizer");
        let out = root.join("fixtures/serving");
        with_lock("serving-fixture.lock", || {
            for args in [
                vec![
                    "python/build_tokenizer.py".into(),
                    "--out".into(),
                    tokenizer.clone(),
                ],
                vec![
                    "python/make_serving_fixture.py".into(),
                    "--tokenizer".into(),
                    tokenizer.clone(),
                    "--out".into(),
                    out.clone(),
                ],
            ] {
                let status = Command::new(&python)
                    .current_dir(&root)
                    .args(&args)
                    .status()
                    .context("running the fixture scripts")?;
                if !status.success() {
                    bail!("{args:?} failed: {status}");
                }
            }
            Ok(())
        })
        .expect("building fixtures/serving");
        out
    })
    .clone()
}

/// Path to the workspace binary `name`, built with the test's profile.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile = profile_dir();
        let release = profile.file_name().is_some_and(|n| n == "release");
        with_lock("bins.lock", || {
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace_root())
                .args(["build", "--quiet", "--workspace", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().context("running cargo build")?;
            if !status.success() {
                bail!("cargo build failed: {status}");
            }
            Ok(())
        })
        .expect("building binaries");
    });
    profile_dir().join(name)
}

/// Runs `caravan-generate` with `args` and one libtorch thread per rank.
pub fn generate(args: &[String]) -> Output {
    Command::new(binary("caravan-generate"))
        .args(args)
        .args(["--threads", "1"])
        .env_remove("RUST_LOG")
        .output()
        .expect("running caravan-generate")
}

/// A tensor read from a safetensors file, widened to f64 (or i64 for integer tensors).
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub floats: Vec<f64>,
    pub ints: Vec<i64>,
}

/// Reads every tensor of a safetensors file (f32, bf16 or i64).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let mut t = HostTensor {
            shape: view.shape().to_vec(),
            floats: vec![],
            ints: vec![],
        };
        match view.dtype() {
            safetensors::Dtype::F32 => {
                t.floats = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect()
            }
            safetensors::Dtype::I64 => {
                t.ints = data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            other => bail!("{name}: unexpected dtype {other:?}"),
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// Largest absolute element-wise difference; panics on a shape mismatch.
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    a.floats
        .iter()
        .zip(&b.floats)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Comma-separated ids, as `caravan-generate` takes them.
pub fn ids(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}
