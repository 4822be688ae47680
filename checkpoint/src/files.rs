//! A checkpoint folder's safetensors files: which files there are, and each tensor's format,
//! shape and byte range, read from the headers alone.
//!
//! A folder holds `model.safetensors`, or several files listed by `model.safetensors.index.json`
//! (a tensor belongs to the file the index names). Opening reads only each file's 8-byte length
//! and JSON header, with positioned reads, and checks that every tensor's bytes match its shape
//! and lie inside its file, so a reader can take any range without checking again.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    ops::Range,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use safetensors::{tensor::Metadata, Dtype};
use serde::Deserialize;

use crate::{Error, Result};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The one file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// A safetensors header larger than this is refused (real ones are a few hundred KiB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// Index into [`SafetensorsFolder::files`].
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The tensor's bytes, as absolute offsets into its file.
    pub bytes: Range<u64>,
}

impl TensorEntry {
    /// The number of bytes the tensor holds.
    pub fn len(&self) -> u64 {
        self.bytes.end - self.bytes.start
    }

    /// Whether the tensor holds no bytes (a dimension of 0).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An opened checkpoint folder: its safetensors files and every tensor in them.
#[derive(Debug)]
pub struct SafetensorsFolder {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// In file order, then by offset within the file.
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafetensorsFolder {
    /// Lists `dir`'s safetensors files (single or sharded with an index) and parses every header.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let (names, weight_map) = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&index_path, e.to_string()))?;
            let names: BTreeSet<String> = index.weight_map.values().cloned().collect();
            if let Some(bad) = names.iter().find(|n| !is_plain_file_name(n)) {
                return Err(Error::checkpoint(
                    &index_path,
                    format!("shard name {bad:?} is not a plain file name"),
                ));
            }
            (names.into_iter().collect(), Some(index.weight_map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::checkpoint(
                dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE}"),
            ));
        };

        let mut files = Vec::with_capacity(names.len());
        let mut tensors = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let mut here = read_header(&path, index)?;
            if let Some(map) = &weight_map {
                here.retain(|t| map.get(&t.name) == Some(name));
            }
            here.sort_by_key(|t| t.bytes.start);
            tensors.extend(here);
            files.push(path);
        }
        let by_name: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        if let Some(map) = &weight_map {
            let mut listed: Vec<_> = map.keys().collect();
            listed.sort();
            if let Some(name) = listed.into_iter().find(|n| !by_name.contains_key(*n)) {
                return Err(Error::checkpoint(
                    &index_path,
                    format!(
                        "{name} is listed in the index but missing from {}",
                        map[name]
                    ),
                ));
            }
        }
        Ok(SafetensorsFolder {
            dir: dir.to_path_buf(),
            files,
            tensors,
            by_name,
        })
    }

    /// The folder this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in the order [`TensorEntry::file`] indexes them.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every tensor, in file order and then by offset within the file.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The tensor called `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// Reads one file's header and checks every tensor's byte range against the file and its shape.
fn read_header(path: &Path, file: usize) -> Result<Vec<TensorEntry>> {
    let handle = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = handle.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    handle
        .read_exact_at(&mut len_bytes, 0)
        .map_err(|_| Error::checkpoint(path, "too short for a safetensors file"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(Error::checkpoint(
            path,
            format!("header length {header_len} does not fit the file ({file_len} bytes)"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    handle
        .read_exact_at(&mut header, 8)
        .map_err(|e| Error::io(path, e))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| Error::checkpoint(path, format!("invalid safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        // The header's own parse checked that the ranges are contiguous and match the shapes.
        if end > data_len {
            return Err(Error::checkpoint(
                path,
                format!("{name}: bytes {begin}..{end} run past the data ({data_len} bytes)"),
            ));
        }
        tensors.push(TensorEntry {
            name,
            file,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: data_start + begin..data_start + end,
        });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(dir: &Path, file: &str, tensors: &[(&str, Vec<usize>)]) {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let bytes = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
                (name.to_string(), bytes, shape.clone())
            })
            .collect();
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(name, bytes, shape)| {
                (
                    name.clone(),
                    TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    #[test]
    fn single_file_lists_every_tensor_with_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            SINGLE_FILE,
            &[("a", vec![2, 3]), ("b", vec![4])],
        );
        let folder = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(folder.files(), &[dir.path().join(SINGLE_FILE)]);
        let a = folder.get("a").unwrap();
        assert_eq!(
            (a.dtype, a.shape.clone(), a.len()),
            (Dtype::F32, vec![2, 3], 24)
        );
        // The range is absolute: reading it gives the tensor's values.
        let raw = std::fs::read(&folder.files()[0]).unwrap();
        let bytes = &raw[a.bytes.start as usize..a.bytes.end as usize];
        assert_eq!(&bytes[4..8], &1f32.to_le_bytes());
        assert_eq!(folder.tensors().len(), 2);
        assert!(folder.get("c").is_none());
    }

    #[test]
    fn sharded_folder_follows_its_index() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "part-1.safetensors",
            &[("a", vec![2]), ("stale", vec![1])],
        );
        write(dir.path(), "part-2.safetensors", &[("b", vec![3])]);
        let index = r#"{"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let folder = SafetensorsFolder::open(dir.path()).unwrap();
        let names: Vec<_> = folder.tensors().iter().map(|t| t.name.as_str()).collect();
        // "stale" is in a file but not in the index: not part of the checkpoint.
        assert_eq!(names, ["a", "b"]);
        assert_eq!(folder.get("b").unwrap().file, 1);

        let missing = r#"{"weight_map": {"a": "part-2.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), missing).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("a is listed in the index but missing from part-2"),
            "{err}"
        );

        let escape = r#"{"weight_map": {"a": "../part-1.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), escape).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a plain file name"), "{err}");
    }

    #[test]
    fn refuses_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");

        let path = dir.path().join(SINGLE_FILE);
        std::fs::write(&path, [1, 2, 3]).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");

        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not fit the file"), "{err}");

        // A header whose tensor claims more bytes than the file holds.
        let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("run past the data"), "{err}");

        // Bytes that do not match the shape (safetensors' own header check).
        let header = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("invalid safetensors header"), "{err}");
    }
}
