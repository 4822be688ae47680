//! `caravanctl convert`: a multi-head Llama checkpoint into a grouped-query one.
//!
//! Each group of consecutive key/value heads is replaced by its mean, the conversion the GQA paper
//! found best (Ainslie et al., arXiv 2305.13245, section 2.1: mean pooling ahead of keeping the
//! first head or random initialisation). Query head `i` attended to KV head `i / (n_q / n_kv)`
//! before and attends to `i / (n_q / G)` after, so the consecutive grouping is the one the model's
//! attention already implies. Weights are streamed tensor by tensor with positioned reads (no
//! mapping of whole files), so converting 70B never holds more than one tensor in memory.
//!
//! The output is a complete Hugging Face folder: sharded safetensors with
//! `model.safetensors.index.json`, `config.json` with the new `num_key_value_heads`, and every
//! other file (tokenizer, generation config) copied. It is written to a sibling temporary folder
//! and renamed into place, so an interrupted conversion leaves nothing half-written behind.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};
use caravan_checkpoint::{LlamaConfig, SafetensorsFolder, TensorEntry};
use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::{json, Value};

/// What to convert, and how to write it.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// The number of KV heads to keep; must divide the checkpoint's KV heads.
    pub kv_heads: usize,
    /// Largest shard file to write, in bytes (a tensor larger than this gets a shard of its own).
    pub max_shard_bytes: u64,
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    pub kv_heads_before: usize,
    pub kv_heads_after: usize,
    pub tensors: usize,
    /// Key/value projections that were mean-pooled (0 when the head count is unchanged).
    pub pooled: usize,
    pub shards: usize,
    pub bytes_written: u64,
    pub bytes_before: u64,
}

/// One safetensors file of the input, read with positioned reads.
struct SourceFile {
    path: PathBuf,
    file: File,
}

/// How an output tensor's bytes are produced from its source.
#[derive(Clone, Copy)]
enum Transform {
    Copy,
    /// Rows are `heads_in * head_dim` (times `columns` each); consecutive groups of `group`
    /// heads are averaged into one.
    MeanPoolHeads {
        heads_out: usize,
        group: usize,
        head_dim: usize,
        columns: usize,
    },
}

struct OutputTensor {
    source: usize,
    shape: Vec<usize>,
    transform: Transform,
}

impl OutputTensor {
    fn bytes(&self, dtype: Dtype) -> u64 {
        (self.shape.iter().product::<usize>() * width(dtype)) as u64
    }
}

/// The attention shape the conversion needs from `config.json`.
struct HeadCounts {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
}

impl From<&LlamaConfig> for HeadCounts {
    fn from(c: &LlamaConfig) -> Self {
        HeadCounts {
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            layers: c.num_hidden_layers,
        }
    }
}

/// Why `target` KV heads cannot be made from `counts`, if it cannot.
fn check_target(counts: &HeadCounts, target: usize) -> Result<()> {
    ensure!(target > 0, "--kv-heads must be at least 1");
    let merges = if target > counts.kv_heads {
        " (mean pooling merges heads, it cannot create them)"
    } else {
        ""
    };
    // The checkpoint's KV heads divide its query heads, so this also keeps G | query heads.
    ensure!(
        counts.kv_heads.is_multiple_of(target),
        "--kv-heads {target} must divide the checkpoint's {} KV heads ({} attention heads), so \
         every new head pools the same number of old ones{merges}; choose one of {}",
        counts.kv_heads,
        counts.q_heads,
        divisors(counts.kv_heads)
    );
    Ok(())
}

fn divisors(n: usize) -> String {
    (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens every safetensors file of `dir` for positioned reads, and lists its tensors (checked
/// against their files) in file order, then offset order.
fn open_sources(dir: &Path) -> Result<(Vec<SourceFile>, Vec<TensorEntry>)> {
    let folder = SafetensorsFolder::open(dir)?;
    let files = folder
        .files()
        .iter()
        .map(|path| {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            Ok(SourceFile {
                path: path.clone(),
                file,
            })
        })
        .collect::<Result<_>>()?;
    Ok((files, folder.tensors().to_vec()))
}

/// Whether `name` is a key or value projection (weight or bias) of some layer.
fn is_kv_projection(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, param)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && matches!(
            param,
            "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.k_proj.bias"
                | "self_attn.v_proj.bias"
        )
}

/// Plans each output tensor: its shape and whether it is pooled.
fn plan_outputs(
    sources: &[TensorEntry],
    counts: &HeadCounts,
    target: usize,
) -> Result<Vec<OutputTensor>> {
    let group = counts.kv_heads / target;
    let kv_rows = counts.kv_heads * counts.head_dim;
    let mut outputs = Vec::with_capacity(sources.len());
    let mut kv_weights = 0;
    for (i, t) in sources.iter().enumerate() {
        ensure!(
            matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16),
            "{}: dtype {:?} is not supported (F32, F16, BF16)",
            t.name,
            t.dtype
        );
        if !is_kv_projection(&t.name) {
            outputs.push(OutputTensor {
                source: i,
                shape: t.shape.clone(),
                transform: Transform::Copy,
            });
            continue;
        }
        ensure!(
            t.shape.first() == Some(&kv_rows),
            "{} has shape {:?}, but {} KV heads of dimension {} need {kv_rows} rows",
            t.name,
            t.shape,
            counts.kv_heads,
            counts.head_dim
        );
        if t.name.ends_with(".weight") {
            kv_weights += 1;
        }
        let columns = t.shape[1..].iter().product();
        let mut shape = t.shape.clone();
        shape[0] = target * counts.head_dim;
        let transform = if group == 1 {
            Transform::Copy
        } else {
            Transform::MeanPoolHeads {
                heads_out: target,
                group,
                head_dim: counts.head_dim,
                columns,
            }
        };
        outputs.push(OutputTensor {
            source: i,
            shape,
            transform,
        });
    }
    ensure!(
        kv_weights == 2 * counts.layers,
        "found {kv_weights} key/value projection weights, but {} layers need {}: is this a Llama \
         checkpoint (model.layers.N.self_attn.{{k,v}}_proj.weight)?",
        counts.layers,
        2 * counts.layers
    );
    Ok(outputs)
}

/// Groups outputs into shards of at most `max_bytes` (a bigger tensor gets its own shard),
/// keeping checkpoint order.
fn assign_shards(
    outputs: &[OutputTensor],
    sources: &[TensorEntry],
    max_bytes: u64,
) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current = 0u64;
    for (i, out) in outputs.iter().enumerate() {
        let bytes = out.bytes(sources[out.source].dtype);
        match shards.last_mut() {
            Some(shard) if current + bytes <= max_bytes => {
                shard.push(i);
                current += bytes;
            }
            _ => {
                shards.push(vec![i]);
                current = bytes;
            }
        }
    }
    shards
}

/// Bytes per element of the (whole-byte) dtypes the conversion supports.
fn width(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

fn decode(dtype: Dtype, bytes: &[u8]) -> impl Iterator<Item = f64> + '_ {
    let width = width(dtype);
    bytes.chunks_exact(width).map(move |c| match dtype {
        Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
        Dtype::F16 => f16::from_le_bytes([c[0], c[1]]).to_f64(),
        _ => bf16::from_le_bytes([c[0], c[1]]).to_f64(),
    })
}

fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * width(dtype));
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            _ => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
        }
    }
    out
}

/// Averages each group of `group` consecutive heads (rows `head_dim * columns` long).
fn mean_pool_heads(
    dtype: Dtype,
    bytes: &[u8],
    heads_out: usize,
    group: usize,
    head_dim: usize,
    columns: usize,
) -> Vec<u8> {
    let head_len = head_dim * columns;
    let mut sums = vec![0f64; heads_out * head_len];
    for (i, value) in decode(dtype, bytes).enumerate() {
        let head_in = i / head_len;
        sums[(head_in / group) * head_len + i % head_len] += value;
    }
    let scale = group as f64;
    for s in &mut sums {
        *s /= scale;
    }
    encode(dtype, &sums)
}

/// Reads and transforms one output tensor's bytes.
fn produce(out: &OutputTensor, sources: &[TensorEntry], files: &[SourceFile]) -> Result<Vec<u8>> {
    let src = &sources[out.source];
    let file = &files[src.file];
    let mut bytes = vec![0u8; src.len() as usize];
    file.file
        .read_exact_at(&mut bytes, src.bytes.start)
        .with_context(|| format!("reading {} from {}", src.name, file.path.display()))?;
    Ok(match out.transform {
        Transform::Copy => bytes,
        Transform::MeanPoolHeads {
            heads_out,
            group,
            head_dim,
            columns,
        } => mean_pool_heads(src.dtype, &bytes, heads_out, group, head_dim, columns),
    })
}

/// Writes one safetensors file: header (tensors placed in the given order, wider dtypes first so
/// every tensor stays aligned), then each tensor's bytes as they are produced.
fn write_shard(
    path: &Path,
    members: &[usize],
    outputs: &[OutputTensor],
    sources: &[TensorEntry],
    files: &[SourceFile],
    on_tensor: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut order = members.to_vec();
    order.sort_by_key(|&i| std::cmp::Reverse(width(sources[outputs[i].source].dtype)));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for &i in &order {
        let out = &outputs[i];
        let src = &sources[out.source];
        let end = offset + out.bytes(src.dtype);
        header.insert(
            src.name.clone(),
            json!({"dtype": src.dtype, "shape": out.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for &i in &order {
        let bytes = produce(&outputs[i], sources, files)?;
        w.write_all(&bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        on_tensor(bytes.len() as u64);
    }
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(offset)
}

/// A conversion checked as far as it can be without reading tensor data, ready to run.
pub struct Conversion {
    options: ConvertOptions,
    config: Value,
    counts: HeadCounts,
    files: Vec<SourceFile>,
    sources: Vec<TensorEntry>,
    outputs: Vec<OutputTensor>,
}

impl Conversion {
    /// Reads the config and every header and checks that the conversion is possible.
    pub fn prepare(options: ConvertOptions) -> Result<Self> {
        let input = &options.input;
        ensure!(input.is_dir(), "{} is not a folder", input.display());
        let config_path = input.join("config.json");
        let counts = HeadCounts::from(&LlamaConfig::from_path(&config_path)?);
        // Written back with only num_key_value_heads changed, every other field as it was.
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        check_target(&counts, options.kv_heads)?;
        let output = &options.output;
        if output.exists() {
            let empty = output.is_dir() && std::fs::read_dir(output)?.next().is_none();
            ensure!(
                empty,
                "{} already exists and is not an empty folder",
                output.display()
            );
        }
        ensure!(
            std::fs::canonicalize(input)? != std::fs::canonicalize(output).unwrap_or_default(),
            "the output folder must differ from the input"
        );
        let (files, sources) = open_sources(input)?;
        let outputs = plan_outputs(&sources, &counts, options.kv_heads)?;
        Ok(Conversion {
            options,
            config,
            counts,
            files,
            sources,
            outputs,
        })
    }

    /// Bytes of tensor data the output will hold.
    pub fn output_bytes(&self) -> u64 {
        self.outputs
            .iter()
            .map(|o| o.bytes(self.sources[o.source].dtype))
            .sum()
    }

    /// Writes the output folder; `on_bytes` is called after each tensor with its size.
    pub fn run(self, on_bytes: &mut dyn FnMut(u64)) -> Result<ConvertReport> {
        let output = &self.options.output;
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(".caravan-convert-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a staging folder in {}", parent.display()))?;

        let shards = assign_shards(&self.outputs, &self.sources, self.options.max_shard_bytes);
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (s, members) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len());
            total += write_shard(
                &staging.path().join(&name),
                members,
                &self.outputs,
                &self.sources,
                &self.files,
                on_bytes,
            )?;
            for &i in members {
                let tensor = &self.sources[self.outputs[i].source].name;
                weight_map.insert(tensor.clone(), name.clone());
            }
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&staging.path().join("model.safetensors.index.json"), &index)?;

        let mut config = self.config.clone();
        config["num_key_value_heads"] = json!(self.options.kv_heads);
        write_json(&staging.path().join("config.json"), &config)?;
        copy_other_files(&self.options.input, staging.path())?;

        // Readable by other users (a non-root pod mounting the folder), like transformers' output.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))?;
        let staged = staging.keep();
        if output.exists() {
            std::fs::remove_dir(output)
                .with_context(|| format!("replacing the empty folder {}", output.display()))?;
        }
        std::fs::rename(&staged, output)
            .with_context(|| format!("moving {} to {}", staged.display(), output.display()))?;

        let pooled = self
            .outputs
            .iter()
            .filter(|o| matches!(o.transform, Transform::MeanPoolHeads { .. }))
            .count();
        let bytes_before = self.sources.iter().map(TensorEntry::len).sum();
        Ok(ConvertReport {
            kv_heads_before: self.counts.kv_heads,
            kv_heads_after: self.options.kv_heads,
            tensors: self.outputs.len(),
            pooled,
            shards: shards.len(),
            bytes_written: total,
            bytes_before,
        })
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Copies every regular file that is not weights, their index or the config (tokenizer files,
/// generation config, licence, readme). `caravan-checkpoint.json`, the stamp by which
/// `python/make_checkpoint.py` knows a generated checkpoint is up to date, describes the input's
/// shape, so it is left behind too.
fn copy_other_files(input: &Path, output: &Path) -> Result<()> {
    for entry in std::fs::read_dir(input)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let skip = name_str.ends_with(".safetensors")
            || name_str == "model.safetensors.index.json"
            || name_str == "config.json"
            || name_str == "caravan-checkpoint.json"
            || name_str.starts_with('.');
        if skip || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), output.join(&name))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layer_key_and_value_projections_are_pooled() {
        assert!(is_kv_projection("model.layers.0.self_attn.k_proj.weight"));
        assert!(is_kv_projection("model.layers.79.self_attn.v_proj.bias"));
        assert!(!is_kv_projection("model.layers.0.self_attn.q_proj.weight"));
        assert!(!is_kv_projection("model.layers.x.self_attn.k_proj.weight"));
        assert!(!is_kv_projection("lm_head.weight"));
    }

    #[test]
    fn mean_pooling_averages_consecutive_heads() {
        // 4 heads of head_dim 1 and 2 columns: rows [h0, h1, h2, h3], pooled in pairs.
        let values = [1.0f64, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        let bytes = encode(Dtype::F32, &values);
        let pooled = mean_pool_heads(Dtype::F32, &bytes, 2, 2, 1, 2);
        let out: Vec<f64> = decode(Dtype::F32, &pooled).collect();
        assert_eq!(out, vec![2.0, 3.0, 20.0, 30.0]);
    }

    #[test]
    fn targets_that_do_not_divide_the_heads_are_refused_with_the_choices() {
        let counts = HeadCounts {
            q_heads: 8,
            kv_heads: 8,
            head_dim: 4,
            layers: 1,
        };
        assert!(check_target(&counts, 2).is_ok());
        assert!(check_target(&counts, 8).is_ok());
        let err = check_target(&counts, 3).unwrap_err().to_string();
        assert!(
            err.contains("must divide") && err.contains("1, 2, 4, 8"),
            "{err}"
        );
        let err = check_target(&counts, 16).unwrap_err().to_string();
        assert!(err.contains("must divide"), "{err}");
        assert!(check_target(&counts, 0).is_err());
    }

    #[test]
    fn shards_respect_the_size_limit_and_keep_order() {
        let sources: Vec<TensorEntry> = (0..4)
            .map(|i| TensorEntry {
                name: format!("t{i}"),
                file: 0,
                dtype: Dtype::F32,
                shape: vec![10],
                bytes: i * 40..i * 40 + 40,
            })
            .collect();
        let outputs: Vec<OutputTensor> = (0..4)
            .map(|i| OutputTensor {
                source: i,
                shape: vec![10],
                transform: Transform::Copy,
            })
            .collect();
        assert_eq!(
            assign_shards(&outputs, &sources, 80),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert_eq!(
            assign_shards(&outputs, &sources, 100),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert_eq!(
            assign_shards(&outputs, &sources, 10),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
        assert_eq!(
            assign_shards(&outputs, &sources, 1000),
            vec![vec![0, 1, 2, 3]]
        );
    }
}
