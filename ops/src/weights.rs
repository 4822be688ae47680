//! Memory-mapped safetensors checkpoints and per-rank weight slicing.
//!
//! A checkpoint is a Hugging Face folder: `model.safetensors`, or several files listed in
//! `model.safetensors.index.json`, listed and checked by `caravan_checkpoint::SafetensorsFolder`.
//! Files are memory-mapped and only the headers are parsed up front; a rank copies out just its
//! own rows or columns of each weight, so no process ever holds the whole model.

use std::{fs::File, ops::Range, path::Path};

use caravan_checkpoint::{SafetensorsFolder, TensorEntry};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use safetensors::Dtype as StDtype;
use tch::{Device, Kind, Tensor};

use crate::{DType, Error, Quantization, Result, TorchKind};

/// Which part of a 2-D `[out, in]` weight a rank takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    /// The whole tensor (norms, replicated tables).
    Full,
    /// Rows `range` of dim 0: column-parallel layers (q/k/v/gate/up, vocab rows).
    Rows(Range<usize>),
    /// Columns `range` of dim 1: row-parallel layers (o/down).
    Columns(Range<usize>),
}

/// A weight the model needs: its checkpoint name and full (unsliced) shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl WeightSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        WeightSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// An opened checkpoint folder: its tensors listed (and checked) by
/// [`SafetensorsFolder`], every file memory-mapped.
pub struct Checkpoint {
    folder: SafetensorsFolder,
    /// One mapping per file of `folder`, in its order.
    mmaps: Vec<Mmap>,
}

impl Checkpoint {
    /// Opens `dir` (single file or sharded with an index), parses every header and maps every
    /// file.
    pub fn open(dir: &Path) -> Result<Self> {
        let folder = SafetensorsFolder::open(dir)?;
        let mut mmaps = Vec::with_capacity(folder.files().len());
        for path in folder.files() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while serving is outside
            // what any loader can defend against (the same contract as safetensors' own mmap).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            mmaps.push(mmap);
        }
        Ok(Checkpoint { folder, mmaps })
    }

    /// The folder this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        self.folder.dir()
    }

    /// Checks that every weight in `specs` exists with its expected shape and a float dtype,
    /// without reading any data. Gives the first problem, naming the tensor.
    pub fn check(&self, specs: &[WeightSpec]) -> Result<()> {
        for spec in specs {
            let (_, dtype, shape) = self.lookup(&spec.name)?;
            if shape != spec.shape {
                return Err(Error::ShapeMismatch {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got: shape,
                });
            }
            st_dtype(&spec.name, dtype)?;
        }
        Ok(())
    }

    fn lookup(&self, name: &str) -> Result<(&TensorEntry, StDtype, Vec<usize>)> {
        let entry = self.folder.get(name).ok_or_else(|| Error::MissingWeight {
            name: name.to_string(),
            dir: self.dir().to_path_buf(),
        })?;
        Ok((entry, entry.dtype, entry.shape.clone()))
    }

    /// Reads `slice` of weight `spec` into a new CPU tensor of its stored dtype.
    fn read(&self, spec: &WeightSpec, slice: &Slice) -> Result<Tensor> {
        let (entry, st, shape) = self.lookup(&spec.name)?;
        if shape != spec.shape {
            return Err(Error::ShapeMismatch {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                got: shape,
            });
        }
        let dtype = st_dtype(&spec.name, st)?;
        // In range: the folder checked every tensor's bytes against its file.
        let bytes = &self.mmaps[entry.file][entry.bytes.start as usize..entry.bytes.end as usize];
        let elt = dtype.size_in_bytes();
        let bad_slice = |what: &str| Error::InvalidCheckpoint {
            path: self.dir().to_path_buf(),
            reason: format!("cannot take {what} of {} with shape {shape:?}", spec.name),
        };
        let tensor = match slice {
            Slice::Full => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                Tensor::f_from_data_size(bytes, &dims, dtype.kind())?
            }
            Slice::Rows(rows) => {
                if shape.len() != 2 || rows.end > shape[0] {
                    return Err(bad_slice(&format!("rows {rows:?}")));
                }
                let row_bytes = shape[1] * elt;
                let data = &bytes[rows.start * row_bytes..rows.end * row_bytes];
                Tensor::f_from_data_size(data, &[rows.len() as i64, shape[1] as i64], dtype.kind())?
            }
            Slice::Columns(cols) => {
                if shape.len() != 2 || cols.end > shape[1] {
                    return Err(bad_slice(&format!("columns {cols:?}")));
                }
                let row_bytes = shape[1] * elt;
                let mut data = Vec::with_capacity(shape[0] * cols.len() * elt);
                for row in bytes.chunks_exact(row_bytes) {
                    data.extend_from_slice(&row[cols.start * elt..cols.end * elt]);
                }
                Tensor::f_from_data_size(
                    &data,
                    &[shape[0] as i64, cols.len() as i64],
                    dtype.kind(),
                )?
            }
        };
        Ok(tensor)
    }
}

fn st_dtype(name: &str, dtype: StDtype) -> Result<DType> {
    DType::from_safetensors(dtype).ok_or_else(|| Error::UnsupportedDtype {
        name: name.to_string(),
        dtype: format!("{dtype:?}"),
    })
}

/// Loads a rank's slices of a checkpoint into tensors of the compute dtype on one device,
/// showing progress.
pub struct WeightLoader<'a> {
    checkpoint: &'a Checkpoint,
    kind: Kind,
    device: Device,
    quantization: Option<Quantization>,
    progress: ProgressBar,
}

impl<'a> WeightLoader<'a> {
    /// `total` is the number of weights that will be loaded, for the progress bar; `show_progress`
    /// draws it on stderr when that is a terminal (ranks other than 0 stay quiet).
    pub fn new(
        checkpoint: &'a Checkpoint,
        dtype: DType,
        device: Device,
        total: usize,
        show_progress: bool,
    ) -> Self {
        let progress = if show_progress {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "loading weights {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
                )
                .expect("static template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        WeightLoader {
            checkpoint,
            kind: dtype.kind(),
            device,
            quantization: None,
            progress,
        }
    }

    /// The loader with the products' weights stored as `quantization` says (none: the compute
    /// dtype).
    pub fn with_quantization(self, quantization: Option<Quantization>) -> Self {
        WeightLoader {
            quantization,
            ..self
        }
    }

    /// How the products' weights are stored.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantization
    }

    /// Loads `slice` of `spec`, converted to the compute dtype and moved to the device: one
    /// tensor at a time, converted on the host, so a GPU never holds a stored-dtype copy (an f32
    /// checkpoint served in bf16 would leave twice each tensor's bytes in libtorch's cache, which
    /// a rank sizing its KV cache from free memory would count as taken).
    pub fn load(&self, spec: &WeightSpec, slice: Slice) -> Result<Tensor> {
        self.progress.set_message(spec.name.clone());
        let tensor = self
            .checkpoint
            .read(spec, &slice)?
            .f_to_kind(self.kind)?
            .f_to_device(self.device)?;
        self.progress.inc(1);
        Ok(tensor)
    }

    /// Clears the progress bar.
    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// Writes `tensors` (name, dtype, shape, bytes) as `dir/file`.
    fn write(dir: &Path, file: &str, tensors: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    /// A 3x4 matrix with element (r, c) = 10r + c.
    fn matrix_f32() -> Vec<u8> {
        (0..12)
            .flat_map(|i| ((i / 4 * 10 + i % 4) as f32).to_le_bytes())
            .collect()
    }

    fn matrix_bf16() -> Vec<u8> {
        (0..12)
            .flat_map(|i| half::bf16::from_f32((i / 4 * 10 + i % 4) as f32).to_le_bytes())
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn slices_rows_and_columns_from_f32_and_bf16_and_converts_dtype() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "model.safetensors",
            &[
                ("a", StDtype::F32, vec![3, 4], matrix_f32()),
                ("b", StDtype::BF16, vec![3, 4], matrix_bf16()),
            ],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        for (name, dtype) in [("a", DType::F32), ("b", DType::BF16)] {
            let spec = WeightSpec::new(name, &[3, 4]);
            let loader = WeightLoader::new(&ckpt, dtype, Device::Cpu, 3, false);
            let rows = loader.load(&spec, Slice::Rows(1..3)).unwrap();
            assert_eq!(rows.size(), [2, 4]);
            assert_eq!(values(&rows), [10., 11., 12., 13., 20., 21., 22., 23.]);
            let cols = loader.load(&spec, Slice::Columns(2..4)).unwrap();
            assert_eq!(cols.size(), [3, 2]);
            assert_eq!(values(&cols), [2., 3., 12., 13., 22., 23.]);
            assert_eq!(cols.kind(), dtype.kind());
        }
        // bf16 stored, f32 compute.
        let loader = WeightLoader::new(&ckpt, DType::F32, Device::Cpu, 1, false);
        let full = loader
            .load(&WeightSpec::new("b", &[3, 4]), Slice::Full)
            .unwrap();
        assert_eq!(full.kind(), Kind::Float);
        assert_eq!(values(&full)[5], 11.0);
    }

    #[test]
    fn errors_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "model.safetensors",
            &[("a", StDtype::F32, vec![3, 4], matrix_f32())],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let err = ckpt.check(&[WeightSpec::new("a", &[4, 3])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "weight a has shape [3, 4], expected [4, 3]"
        );
        let err = ckpt.check(&[WeightSpec::new("zzz", &[1])]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("missing weight zzz in checkpoint"),
            "{err}"
        );
        let loader = WeightLoader::new(&ckpt, DType::F32, Device::Cpu, 1, false);
        let err = loader
            .load(&WeightSpec::new("a", &[3, 4]), Slice::Rows(2..5))
            .unwrap_err();
        assert!(err.to_string().contains("rows 2..5 of a"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(empty.path()).err().unwrap();
        assert!(err.to_string().contains("no model.safetensors"), "{err}");
    }

    #[test]
    fn sharded_checkpoints_follow_the_index() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "part-1.safetensors",
            &[("a", StDtype::F32, vec![3, 4], matrix_f32())],
        );
        write(
            dir.path(),
            "part-2.safetensors",
            &[("b", StDtype::BF16, vec![3, 4], matrix_bf16())],
        );
        let index = r#"{"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        ckpt.check(&[WeightSpec::new("a", &[3, 4]), WeightSpec::new("b", &[3, 4])])
            .unwrap();
        // An index naming a tensor its file lacks is caught at open.
        let bad = r#"{"weight_map": {"a": "part-2.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), bad).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap();
        assert!(
            err.to_string()
                .contains("a is listed in the index but missing"),
            "{err}"
        );
    }
}
