//! Hugging Face checkpoint directories: `config.json`, optional `generation_config.json`,
//! and weights in `model.safetensors` or in shards listed by
//! `model.safetensors.index.json`.
//!
//! Each weight file is memory-mapped once; tensors are handed out as zero-copy
//! [`WeightSource`] views under their Hugging Face names. Headers are parsed and checked
//! (offsets contiguous, sizes matching shape and dtype, data covering the file exactly)
//! by the `safetensors` crate; a bad file is a one-line error naming it, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use kiln_kernels::GgmlType;
use kiln_runtime::{HostBytes, WeightSource};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::gguf::{map_file, SharedBytes};

/// The single-file weights name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Errors opening a checkpoint or reading its weights. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("`{}` not found", .0.display())]
    NotFound(PathBuf),
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("`{}`: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("`{}`: invalid safetensors file: {source}", path.display())]
    BadFile { path: PathBuf, source: SafeTensorError },
    #[error("`{}` has neither {WEIGHTS_FILE} nor {INDEX_FILE}", .0.display())]
    NoWeights(PathBuf),
    #[error("no tensor named `{0}` in the checkpoint")]
    MissingTensor(String),
    #[error("tensor `{name}` has dtype {dtype}; kiln reads F32, F16 and BF16 weights")]
    UnsupportedDtype { name: String, dtype: String },
}

pub type Result<T, E = SafetensorsError> = std::result::Result<T, E>;

/// One memory-mapped weight file.
struct Shard {
    bytes: SharedBytes,
}

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard.
    range: Range<usize>,
}

/// An opened Hugging Face checkpoint directory.
pub struct SafetensorsCheckpoint {
    dir: PathBuf,
    config: serde_json::Value,
    generation_config: Option<serde_json::Value>,
    shard_paths: Vec<PathBuf>,
    shards: Vec<Shard>,
    /// Tensor names in load order: shard by shard, by offset within each.
    names: Vec<String>,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for SafetensorsCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsCheckpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shard_paths)
            .field("tensors", &self.names.len())
            .finish()
    }
}

fn io_error(path: &Path, source: std::io::Error) -> SafetensorsError {
    if source.kind() == std::io::ErrorKind::NotFound {
        SafetensorsError::NotFound(path.to_owned())
    } else {
        SafetensorsError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).map_err(|e| io_error(path, e))?;
    serde_json::from_slice(&text).map_err(|source| SafetensorsError::Json {
        path: path.to_owned(),
        source,
    })
}

/// The tensors of one safetensors file, `shard` of the checkpoint, in offset order.
fn read_header(path: &Path, bytes: &[u8], shard: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |source| SafetensorsError::BadFile {
        path: path.to_owned(),
        source,
    };
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    // read_metadata has checked that 8 + header + data is exactly the file.
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for name in metadata.offset_keys() {
        let info = metadata
            .info(&name)
            .ok_or_else(|| bad(SafeTensorError::TensorNotFound(name.clone())))?;
        let (start, end) = info.data_offsets;
        let range = data_start + start..data_start + end;
        if range.end > bytes.len() {
            return Err(bad(SafeTensorError::InvalidOffset(name)));
        }
        let entry = Entry {
            shard,
            dtype: info.dtype,
            shape: info.shape.clone(),
            range,
        };
        out.push((name, entry));
    }
    Ok(out)
}

impl SafetensorsCheckpoint {
    /// Opens the checkpoint in `dir`: reads its configs and maps its weight files.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(SafetensorsError::NotFound(config_path));
        }
        let config = read_json(&config_path)?;
        let generation_path = dir.join("generation_config.json");
        let generation_config = if generation_path.is_file() {
            Some(read_json(&generation_path)?)
        } else {
            None
        };

        let mut ckpt = SafetensorsCheckpoint {
            dir: dir.to_owned(),
            config,
            generation_config,
            shard_paths: Vec::new(),
            shards: Vec::new(),
            names: Vec::new(),
            tensors: HashMap::new(),
        };

        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.is_file() {
            for (name, entry) in ckpt.map_shard(&single)? {
                ckpt.add(name, entry);
            }
        } else if index_path.is_file() {
            ckpt.open_sharded(&index_path)?;
        } else {
            return Err(SafetensorsError::NoWeights(dir.to_owned()));
        }
        Ok(ckpt)
    }

    /// Maps one weight file and reads its tensors.
    fn map_shard(&mut self, path: &Path) -> Result<Vec<(String, Entry)>> {
        let bytes = map_file(path).map_err(|e| io_error(path, e))?;
        let tensors = read_header(path, (*bytes).as_ref(), self.shards.len())?;
        self.shards.push(Shard { bytes });
        self.shard_paths.push(path.to_owned());
        Ok(tensors)
    }

    fn add(&mut self, name: String, entry: Entry) {
        self.names.push(name.clone());
        self.tensors.insert(name, entry);
    }

    fn open_sharded(&mut self, index_path: &Path) -> Result<()> {
        let bad = |reason: String| SafetensorsError::BadIndex {
            path: index_path.to_owned(),
            reason,
        };
        let index = read_json(index_path)?;
        let map = index.get("weight_map").ok_or_else(|| bad("no `weight_map`".into()))?;
        let map = map
            .as_object()
            .ok_or_else(|| bad("`weight_map` is not an object".into()))?;
        // Shard file → the names the index assigns to it.
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map` entry `{name}` is not a file name")))?;
            by_shard.entry(file).or_default().push(name);
        }
        for (file, mut wanted) in by_shard {
            let path = self.dir.join(file);
            let mut present: HashMap<String, Entry> = self.map_shard(&path)?.into_iter().collect();
            // Keep shard order by offset, as a single file would.
            wanted.sort_by_key(|n| present.get(*n).map(|e| e.range.start));
            for name in wanted {
                let entry = present
                    .remove(name)
                    .ok_or_else(|| bad(format!("maps `{name}` to `{file}`, which has no such tensor")))?;
                self.add(name.to_owned(), entry);
            }
        }
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// `generation_config.json`, when present.
    pub fn generation_config(&self) -> Option<&serde_json::Value> {
        self.generation_config.as_ref()
    }

    /// The weight files, in the order they were mapped.
    pub fn files(&self) -> &[PathBuf] {
        &self.shard_paths
    }

    /// Tensor names, shard by shard in offset order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.names.iter().map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's shape as stored (row-major, last dimension contiguous).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor's dtype name as stored ("BF16", "F32", "I64", ...).
    pub fn dtype(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| e.dtype.to_string())
    }

    /// A tensor as a weight, its bytes a view into the mapped file (no copy).
    ///
    /// F32, F16 and BF16 map to the GGML types of the same name. The last dimension is
    /// the row: a vector is one row, a matrix `[rows, cols]`, and higher ranks fold their
    /// leading dimensions into rows (a scalar is one row of one element).
    pub fn weight(&self, hf_name: &str) -> Result<WeightSource> {
        let entry = self
            .tensors
            .get(hf_name)
            .ok_or_else(|| SafetensorsError::MissingTensor(hf_name.into()))?;
        let ty = match entry.dtype {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(SafetensorsError::UnsupportedDtype {
                    name: hf_name.into(),
                    dtype: other.to_string(),
                })
            }
        };
        let (cols, rows) = match entry.shape.split_last() {
            Some((&cols, lead)) => (cols, lead.iter().product()),
            None => (1, 1),
        };
        let bytes = HostBytes::new(self.shards[entry.shard].bytes.clone(), entry.range.clone())
            .expect("tensor ranges are checked against the file when it is opened");
        Ok(WeightSource {
            name: hf_name.to_owned(),
            ty,
            rows,
            cols,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::safetensors::tensor::TensorView;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("kiln-st-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// (name, dtype, shape, data)
    type T = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn serialize(tensors: &[T]) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        ::safetensors::serialize(views, None).unwrap()
    }

    fn sample_tensors() -> Vec<T> {
        vec![
            (
                "model.embed_tokens.weight",
                Dtype::F32,
                vec![3, 2],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ),
            ("model.norm.weight", Dtype::BF16, vec![4], vec![1, 2, 3, 4, 5, 6, 7, 8]),
            (
                "model.layers.0.mlp.experts",
                Dtype::F16,
                vec![2, 3, 2],
                (0..24).collect(),
            ),
            ("model.scalar", Dtype::F32, vec![], f32_bytes(&[9.0])),
            ("model.position_ids", Dtype::I64, vec![2], vec![0; 16]),
        ]
    }

    fn write_config(dir: &TempDir) {
        dir.write(
            "config.json",
            r#"{"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 1}"#,
        );
    }

    fn err(dir: &Path) -> String {
        let e = SafetensorsCheckpoint::open(dir).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    fn check_sample_weights(ckpt: &SafetensorsCheckpoint) {
        let w = ckpt.weight("model.embed_tokens.weight").unwrap();
        assert_eq!(
            (w.name.as_str(), w.ty, w.rows, w.cols),
            ("model.embed_tokens.weight", GgmlType::F32, 3, 2)
        );
        assert_eq!(w.bytes.as_slice(), f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        w.validate().unwrap();

        let n = ckpt.weight("model.norm.weight").unwrap();
        assert_eq!((n.ty, n.rows, n.cols), (GgmlType::BF16, 1, 4));
        assert_eq!(n.bytes.as_slice(), [1, 2, 3, 4, 5, 6, 7, 8]);
        n.validate().unwrap();

        let e = ckpt.weight("model.layers.0.mlp.experts").unwrap();
        assert_eq!((e.ty, e.rows, e.cols), (GgmlType::F16, 6, 2));
        assert_eq!(e.bytes.as_slice(), (0..24).collect::<Vec<u8>>());
        e.validate().unwrap();

        let s = ckpt.weight("model.scalar").unwrap();
        assert_eq!((s.rows, s.cols), (1, 1));
        s.validate().unwrap();

        assert_eq!(ckpt.shape("model.layers.0.mlp.experts"), Some(&[2, 3, 2][..]));
        assert_eq!(ckpt.dtype("model.position_ids").as_deref(), Some("I64"));
        assert!(ckpt.has("model.position_ids"));
        assert_eq!(
            ckpt.weight("model.position_ids").err().unwrap().to_string(),
            "tensor `model.position_ids` has dtype I64; kiln reads F32, F16 and BF16 weights"
        );
        assert!(!ckpt.has("lm_head.weight"));
        assert_eq!(
            ckpt.weight("lm_head.weight").err().unwrap().to_string(),
            "no tensor named `lm_head.weight` in the checkpoint"
        );
    }

    #[test]
    fn single_file() {
        let dir = TempDir::new("single");
        write_config(&dir);
        dir.write("generation_config.json", r#"{"eos_token_id": [1, 2]}"#);
        dir.write(WEIGHTS_FILE, serialize(&sample_tensors()));
        let ckpt = SafetensorsCheckpoint::open(&dir.0).unwrap();
        assert_eq!(ckpt.dir(), dir.0);
        assert_eq!(ckpt.config()["model_type"], "llama");
        assert_eq!(ckpt.generation_config().unwrap()["eos_token_id"][1], 2);
        assert_eq!(ckpt.files(), [dir.0.join(WEIGHTS_FILE)]);
        assert_eq!(ckpt.names().len(), 5);
        let mut names: Vec<_> = ckpt.names().collect();
        names.sort();
        let mut want: Vec<_> = sample_tensors().iter().map(|t| t.0).collect();
        want.sort();
        assert_eq!(names, want);
        check_sample_weights(&ckpt);

        // Views outlive the checkpoint (they share the map).
        let w = ckpt.weight("model.embed_tokens.weight").unwrap();
        drop(ckpt);
        assert_eq!(w.bytes.as_slice()[..4], 1.0f32.to_le_bytes());
    }

    #[test]
    fn no_generation_config_is_fine() {
        let dir = TempDir::new("nogen");
        write_config(&dir);
        dir.write(WEIGHTS_FILE, serialize(&sample_tensors()));
        let ckpt = SafetensorsCheckpoint::open(&dir.0).unwrap();
        assert!(ckpt.generation_config().is_none());
    }

    fn write_sharded(dir: &TempDir) {
        let all = sample_tensors();
        let (a, b) = all.split_at(2);
        dir.write("model-00001-of-00002.safetensors", serialize(a));
        dir.write("model-00002-of-00002.safetensors", serialize(b));
        let mut map = serde_json::Map::new();
        for (i, part) in [a, b].iter().enumerate() {
            for t in part.iter() {
                map.insert(t.0.into(), format!("model-0000{}-of-00002.safetensors", i + 1).into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 100}, "weight_map": map});
        dir.write(INDEX_FILE, index.to_string());
    }

    #[test]
    fn sharded() {
        let dir = TempDir::new("sharded");
        write_config(&dir);
        write_sharded(&dir);
        let ckpt = SafetensorsCheckpoint::open(&dir.0).unwrap();
        assert_eq!(ckpt.files().len(), 2);
        assert_eq!(ckpt.names().len(), 5);
        check_sample_weights(&ckpt);
        assert!(format!("{ckpt:?}").contains("tensors: 5"));
    }

    #[test]
    fn sharded_index_problems() {
        let dir = TempDir::new("badindex");
        write_config(&dir);
        write_sharded(&dir);
        let index_path = dir.0.join(INDEX_FILE);

        let index = serde_json::json!({"weight_map": {
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "ghost": "model-00001-of-00002.safetensors",
        }});
        dir.write(INDEX_FILE, index.to_string());
        assert_eq!(
            err(&dir.0),
            format!(
                "`{}`: maps `ghost` to `model-00001-of-00002.safetensors`, which has no such tensor",
                index_path.display()
            )
        );

        let index = serde_json::json!({"weight_map": {"x": "model-00009-of-00009.safetensors"}});
        dir.write(INDEX_FILE, index.to_string());
        assert_eq!(
            err(&dir.0),
            format!(
                "`{}` not found",
                dir.0.join("model-00009-of-00009.safetensors").display()
            )
        );

        dir.write(INDEX_FILE, r#"{"metadata": {}}"#);
        assert_eq!(err(&dir.0), format!("`{}`: no `weight_map`", index_path.display()));

        dir.write(INDEX_FILE, r#"{"weight_map": {"x": 3}}"#);
        assert_eq!(
            err(&dir.0),
            format!("`{}`: `weight_map` entry `x` is not a file name", index_path.display())
        );

        dir.write(INDEX_FILE, "{");
        assert!(err(&dir.0).starts_with(&format!("`{}`: invalid JSON: ", index_path.display())));
    }

    #[test]
    fn missing_files() {
        let dir = TempDir::new("missing");
        assert_eq!(err(&dir.0), format!("`{}/config.json` not found", dir.0.display()));
        write_config(&dir);
        assert_eq!(
            err(&dir.0),
            format!(
                "`{}` has neither model.safetensors nor model.safetensors.index.json",
                dir.0.display()
            )
        );
        dir.write("config.json", "{not json");
        dir.write(WEIGHTS_FILE, serialize(&sample_tensors()));
        assert!(err(&dir.0).starts_with(&format!("`{}/config.json`: invalid JSON: ", dir.0.display())));
    }

    #[test]
    fn corrupt_headers() {
        let dir = TempDir::new("corrupt");
        write_config(&dir);
        let good = serialize(&sample_tensors());
        let file = dir.0.join(WEIGHTS_FILE);
        let prefix = format!("`{}`: invalid safetensors file: ", file.display());
        let check = |bytes: &[u8], want: &str| {
            dir.write(WEIGHTS_FILE, bytes);
            let e = err(&dir.0);
            assert!(e.starts_with(&prefix), "{e}");
            assert!(e.ends_with(want), "{e}");
        };

        // A length prefix far past the end, and one that is merely too long.
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&huge, "header too large");
        let mut long = good.clone();
        long[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        check(&long, "invalid header length");

        // Invalid JSON in the header.
        let mut bad_json = good.clone();
        bad_json[8] = b'[';
        check(&bad_json, "");
        assert!(err(&dir.0).contains("invalid JSON in header"));

        // Offsets past the end of the data.
        let header = serde_json::json!({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).to_string();
        let mut past = (header.len() as u64).to_le_bytes().to_vec();
        past.extend_from_slice(header.as_bytes());
        past.extend_from_slice(&[0; 8]);
        check(&past, "incomplete metadata, file not fully covered");

        // Offsets that disagree with shape and dtype.
        let header = serde_json::json!({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).to_string();
        let mut wrong = (header.len() as u64).to_le_bytes().to_vec();
        wrong.extend_from_slice(header.as_bytes());
        wrong.extend_from_slice(&[0; 8]);
        check(&wrong, "invalid shape, data type, or offset for tensor");

        // An empty file.
        check(&[], "header too small");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let dir = TempDir::new("truncated");
        write_config(&dir);
        let good = serialize(&sample_tensors());
        for len in 0..good.len() {
            dir.write(WEIGHTS_FILE, &good[..len]);
            let e = err(&dir.0);
            assert!(e.contains("invalid safetensors file"), "{len}: {e}");
        }
    }

    #[test]
    fn mutated_headers_never_panic() {
        let good = serialize(&sample_tensors());
        let path = Path::new("mem.safetensors");
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        for i in 0..header_end {
            for b in [b'0', b'9', b'-', b'"', b'{', b']', 0xff] {
                let mut m = good.clone();
                m[i] = b;
                if let Ok(tensors) = read_header(path, &m, 0) {
                    assert!(tensors.iter().all(|(_, e)| e.range.end <= m.len()));
                }
            }
        }
    }
}
