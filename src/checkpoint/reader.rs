//! Reading safetensors checkpoints (a single file, an HF directory, or HF shards with an index)
//! with bounded memory.
//!
//! Only the headers are parsed at open time; tensor data is read on demand with positioned
//! reads (`pread`) into caller-provided buffers. Nothing is memory-mapped and no file is read
//! whole, so peak memory does not grow with the size of the model. Reads go through `&self` and
//! are safe to issue from several threads at once. Whole tensors of 32 MiB or more that are
//! mostly not in the page cache are read past it ([`super::direct`]; `UDELTA_DIRECT_READS=off`
//! turns that off).

use super::direct::{self, TensorBuf};
use super::dtype::{byte_len, dtype_name, Dtype, FloatType};
use super::views::MatrixOf;
use crate::bytesource::ByteSource;
use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The environment variable that turns direct reads off (`off`) or sets the smallest tensor
/// read directly (a number of bytes; default [`direct::DIRECT_MIN`]).
pub const DIRECT_READS_ENV: &str = "UDELTA_DIRECT_READS";

/// The smallest tensor read past the page cache when not cached, `None` when direct reads are
/// off (an unreadable value keeps the default).
fn direct_read_min() -> Option<u64> {
    match std::env::var(DIRECT_READS_ENV) {
        Ok(v) if v == "off" => None,
        Ok(v) => Some(v.parse().unwrap_or(direct::DIRECT_MIN)),
        Err(_) => Some(direct::DIRECT_MIN),
    }
}

/// Largest accepted JSON header, in bytes (the limit the `safetensors` crate uses too).
pub use crate::limits::MAX_SAFETENSORS_HEADER_LEN as MAX_HEADER_LEN;
use crate::limits::MAX_SHARD_INDEX_LEN;

/// Single-file checkpoint name inside an HF model directory.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";

/// Shard index name inside an HF model directory.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// How a checkpoint was laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// A `.safetensors` file given directly.
    SingleFile,
    /// A directory holding one safetensors file (`model.safetensors`, or the only
    /// `*.safetensors` file there).
    Directory,
    /// Shards listed by a `*.safetensors.index.json` (normally `model.safetensors.index.json`).
    Sharded,
}

/// One safetensors file of a checkpoint, kept open for positioned reads.
#[derive(Debug)]
pub struct ShardFile {
    /// Full path of the file.
    pub path: PathBuf,
    /// File name as the index (or directory) names it, e.g. `model-00001-of-00002.safetensors`.
    pub file_name: String,
    /// The header's `__metadata__` map, if it has one (written back on decompress).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Absolute offset of the data section: 8 + header length.
    pub data_start: u64,
    /// Length of the data section in bytes (file length - `data_start`).
    pub data_len: u64,
    file: File,
    /// The same file opened for direct reads, once one is tried (`None` where that fails).
    direct: std::sync::OnceLock<Option<File>>,
}

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Absolute offset of the first byte in the shard file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// For a matrix view ([`super::views`]): the 3-D tensor it is a matrix of; `None` for a
    /// tensor of the file.
    pub matrix_of: Option<MatrixOf>,
}

impl TensorEntry {
    /// Number of elements (1 for a scalar, 0 if any dimension is 0).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// The compressible float type (f16, bf16, f32), or `None` for any other dtype.
    pub fn float_type(&self) -> Option<FloatType> {
        FloatType::from_dtype(self.dtype)
    }

    /// Whether this tensor has the shape of `base` or the same shape with more rows (a grown
    /// vocabulary: the base's bytes are then a prefix of this tensor's). Never for a scalar.
    pub fn extends_rows_of(&self, base: &TensorEntry) -> bool {
        shape_extends_rows(&self.shape, &base.shape)
    }
}

/// Whether `shape` is `base` or `base` with more rows (see [`TensorEntry::extends_rows_of`]).
pub fn shape_extends_rows(shape: &[usize], base: &[usize]) -> bool {
    !shape.is_empty() && shape.len() == base.len() && shape[0] >= base[0] && shape[1..] == base[1..]
}

/// An opened safetensors checkpoint: all headers parsed and validated, files held open.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path given to [`Checkpoint::open`].
    pub path: PathBuf,
    /// How it is laid out.
    pub layout: Layout,
    /// Its files; for [`Layout::Sharded`] in file-name order.
    pub shards: Vec<ShardFile>,
    /// Every tensor, ordered by shard, then by offset (ties, only possible between empty
    /// tensors, by name).
    pub tensors: Vec<TensorEntry>,
    /// The index's path, for [`Layout::Sharded`].
    pub index_path: Option<PathBuf>,
    /// The index's `"metadata"` object (e.g. `{"total_size": ...}`), kept to write it back.
    pub index_metadata: Option<Value>,
    by_name: HashMap<String, usize>,
    /// Bytes of tensor data read so far ([`Checkpoint::bytes_read`]).
    bytes_read: std::sync::atomic::AtomicU64,
    /// Of them, bytes read past the page cache ([`Checkpoint::bytes_read_direct`]).
    bytes_read_direct: std::sync::atomic::AtomicU64,
}

impl Checkpoint {
    /// Opens a checkpoint and validates every header.
    ///
    /// `path` is one of:
    /// - a safetensors file ([`Layout::SingleFile`]);
    /// - a `*.safetensors.index.json` file: the shards it lists, beside it ([`Layout::Sharded`]);
    /// - a directory holding, in this order of preference (the order `transformers` uses):
    ///   `model.safetensors` ([`Layout::Directory`]); `model.safetensors.index.json` and its
    ///   shards ([`Layout::Sharded`]); else exactly one `*.safetensors.index.json`; else exactly
    ///   one `*.safetensors` file. Anything else is an error listing what the directory holds.
    ///
    /// Each file's header is checked (length, JSON, dtypes, shapes against contiguous
    /// `data_offsets`, data section length equal to what the file holds), and a shard index
    /// must agree with the shards: every listed tensor is in the shard it names, no tensor is
    /// in two shards or missing from the index, and every listed shard exists.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        crate::special_files::refuse_special(path, "the checkpoint")?;
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        let name = file_name_of(path)?;
        if name.ends_with(".index.json") {
            return Self::open_sharded(path, path);
        }
        let shard = open_shard(path, name)?;
        Self::assemble(path, Layout::SingleFile, vec![shard], None, None)
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join(SINGLE_FILE_NAME);
        if single.is_file() {
            let shard = open_shard(&single, SINGLE_FILE_NAME.to_string())?;
            return Self::assemble(dir, Layout::Directory, vec![shard], None, None);
        }
        let index = dir.join(INDEX_FILE_NAME);
        if index.is_file() {
            return Self::open_sharded(dir, &index);
        }
        let entries = list_dir(dir)?;
        let indexes: Vec<&String> = entries
            .iter()
            .filter(|n| n.ends_with(".safetensors.index.json") && dir.join(n).is_file())
            .collect();
        if indexes.len() == 1 {
            return Self::open_sharded(dir, &dir.join(indexes[0]));
        }
        let files: Vec<&String> = entries
            .iter()
            .filter(|n| n.ends_with(".safetensors") && dir.join(n).is_file())
            .collect();
        if indexes.is_empty() && files.len() == 1 {
            let path = dir.join(files[0]);
            let shard = open_shard(&path, files[0].clone())?;
            return Self::assemble(dir, Layout::Directory, vec![shard], None, None);
        }
        let what = if indexes.len() > 1 {
            format!(
                "{} shard indexes ({}) and no {INDEX_FILE_NAME}: pass the index file to use",
                indexes.len(),
                join_names(&indexes)
            )
        } else if files.len() > 1 {
            format!(
                "{} safetensors files ({}) but neither {SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}: \
                 pass one file, or add an index",
                files.len(),
                join_names(&files)
            )
        } else {
            let found = if entries.is_empty() {
                "nothing".to_string()
            } else {
                join_names(&entries.iter().collect::<Vec<_>>())
            };
            format!(
                "no safetensors checkpoint here: no {SINGLE_FILE_NAME}, no {INDEX_FILE_NAME}, \
                 no *.safetensors file (found: {found})"
            )
        };
        Err(Error::checkpoint(dir, what))
    }

    fn open_sharded(path: &Path, index_path: &Path) -> Result<Checkpoint> {
        let index_name = file_name_of(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let (metadata, weight_map) = read_index(index_path)?;

        // Shard file -> first tensor the index maps to it (for error messages).
        let mut shard_names: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in &weight_map {
            shard_names.entry(shard.as_str()).or_insert(tensor.as_str());
        }
        let mut shards = Vec::with_capacity(shard_names.len());
        for (&name, &tensor) in &shard_names {
            let plain = Path::new(name).file_name().is_some_and(|f| f == name);
            if !plain {
                return Err(Error::tensor(
                    index_path,
                    tensor,
                    format!(
                        "shard name '{name}' is not a plain file name in the index's directory"
                    ),
                ));
            }
            let shard_path = dir.join(name);
            if !shard_path.exists() {
                return Err(Error::tensor(
                    &shard_path,
                    tensor,
                    format!(
                        "shard '{name}' is listed in {index_name} (for this tensor and maybe \
                         others) but does not exist"
                    ),
                ));
            }
            shards.push(open_shard(&shard_path, name.to_string())?);
        }
        let ckpt = Self::assemble(
            path,
            Layout::Sharded,
            shards,
            Some(index_path.to_path_buf()),
            metadata,
        )?;

        let shard_ix: HashMap<&str, usize> = ckpt
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.file_name.as_str(), i))
            .collect();
        for (tensor, shard) in &weight_map {
            let shard_ix = shard_ix[shard.as_str()];
            match ckpt.get(tensor) {
                None => {
                    return Err(Error::tensor(
                        &ckpt.shards[shard_ix].path,
                        tensor,
                        format!("listed in {index_name} as in this shard, but absent from it"),
                    ))
                }
                Some(t) if t.shard != shard_ix => {
                    return Err(Error::tensor(
                        &ckpt.shards[t.shard].path,
                        tensor,
                        format!("is in this shard, but {index_name} says it is in '{shard}'"),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(t) = ckpt
            .tensors
            .iter()
            .find(|t| !weight_map.contains_key(&t.name))
        {
            return Err(Error::tensor(
                &ckpt.shards[t.shard].path,
                &t.name,
                format!("is in this shard but not listed in the weight_map of {index_name}"),
            ));
        }
        Ok(ckpt)
    }

    /// Builds the tensor table of already-validated shards; rejects a tensor in two shards.
    fn assemble(
        path: &Path,
        layout: Layout,
        opened: Vec<(ShardFile, Vec<(String, TensorInfo)>)>,
        index_path: Option<PathBuf>,
        index_metadata: Option<Value>,
    ) -> Result<Checkpoint> {
        let mut tensors = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut shards: Vec<ShardFile> = Vec::with_capacity(opened.len());
        for (ix, (shard, header)) in opened.into_iter().enumerate() {
            for (name, info) in header {
                if let Some(&prev) = by_name.get(&name) {
                    let other: &TensorEntry = &tensors[prev];
                    return Err(Error::tensor(
                        &shard.path,
                        &name,
                        // `other` is in an earlier shard, already in `shards`.
                        format!(
                            "is also in shard '{}': a tensor may be in only one shard",
                            shards[other.shard].file_name
                        ),
                    ));
                }
                by_name.insert(name.clone(), tensors.len());
                tensors.push(TensorEntry {
                    name,
                    dtype: info.dtype,
                    shape: info.shape,
                    shard: ix,
                    offset: shard.data_start + info.data_offsets.0 as u64,
                    len: (info.data_offsets.1 - info.data_offsets.0) as u64,
                    matrix_of: None,
                });
            }
            shards.push(shard);
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            layout,
            shards,
            tensors,
            index_path,
            index_metadata,
            by_name,
            bytes_read: Default::default(),
            bytes_read_direct: Default::default(),
        })
    }

    /// The same checkpoint with another tensor list (in the same order of shards and
    /// offsets, e.g. with matrix views in place of a 3-D tensor). Two tensors of one name are
    /// an error naming it.
    pub(crate) fn with_tensors(self, tensors: Vec<TensorEntry>) -> Result<Checkpoint> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::tensor(
                    self.shard_path(t),
                    &t.name,
                    "a matrix view of a 3-D tensor would have this name, which another tensor has",
                ));
            }
        }
        Ok(Checkpoint {
            tensors,
            by_name,
            ..self
        })
    }

    /// The tensor called `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.index_of(name).map(|i| &self.tensors[i])
    }

    /// Where the tensor called `name` sits in [`Checkpoint::tensors`], if the checkpoint has it
    /// (a map look-up, not a search).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The tensors of shard `shard`, in offset order (empty if out of range).
    pub fn shard_tensors(&self, shard: usize) -> &[TensorEntry] {
        let start = self.tensors.partition_point(|t| t.shard < shard);
        let end = self.tensors.partition_point(|t| t.shard <= shard);
        &self.tensors[start..end]
    }

    /// Path of the file holding `t`.
    ///
    /// # Panics
    /// If `t` does not come from this checkpoint (its shard index is out of range).
    pub fn shard_path(&self, t: &TensorEntry) -> &Path {
        &self.shards[t.shard].path
    }

    /// Reads bytes `[start, start + buf.len())` of tensor `t` into `buf`.
    ///
    /// The range is checked against the tensor and the tensor against its file; a failed read
    /// (e.g. the file shrank after it was opened) is an error naming the file and the tensor.
    pub fn read_range(&self, t: &TensorEntry, start: u64, buf: &mut [u8]) -> Result<()> {
        let shard = self.check_range(t, start, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let pos = t.offset + start;
        (self.bytes_read).fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        FileExt::read_exact_at(&shard.file, buf, pos).map_err(|e| {
            let msg = if e.kind() == ErrorKind::UnexpectedEof {
                format!(
                    "file ended while reading {} bytes at offset {pos}: it was truncated \
                     after it was opened",
                    buf.len()
                )
            } else {
                format!("read of {} bytes at offset {pos} failed: {e}", buf.len())
            };
            Error::tensor(&shard.path, &t.name, msg)
        })
    }

    /// Reads the whole of tensor `t` into `buf` (resized to `t.len`; its capacity is reused).
    pub fn read_tensor(&self, t: &TensorEntry, buf: &mut Vec<u8>) -> Result<()> {
        let (_, len) = self.whole_tensor(t)?;
        // Only growth is zero-filled: the read overwrites every byte.
        buf.truncate(len);
        buf.resize(len, 0);
        self.read_range(t, 0, buf)
    }

    /// Reads the whole of tensor `t` into `buf` (its memory is reused): past the page cache
    /// when `t` is large and mostly not cached, straight into place; otherwise through the
    /// cache.
    pub fn read_tensor_into(&self, t: &TensorEntry, buf: &mut TensorBuf) -> Result<()> {
        let (shard, len) = self.whole_tensor(t)?;
        if self.read_direct(shard, t, len, buf) {
            return Ok(());
        }
        self.read_range(t, 0, buf.prepare(len))
    }

    /// The shard of tensor `t` and its length in memory, once `t` is known to lie within its
    /// shard and to fit this platform's memory.
    fn whole_tensor(&self, t: &TensorEntry) -> Result<(&ShardFile, usize)> {
        let shard = self.check_range(t, 0, t.len)?;
        let len = usize::try_from(t.len).map_err(|_| {
            Error::tensor(
                &shard.path,
                &t.name,
                "tensor too large for this platform's memory",
            )
        })?;
        Ok((shard, len))
    }

    /// Reads all of tensor `t` (`len` bytes) of `shard` into `buf` past the page cache when
    /// it is large and mostly not cached; false when it was not read so (too small, cached,
    /// direct reads off or failing: the caller then reads it through the cache, which reports
    /// any real error).
    fn read_direct(
        &self,
        shard: &ShardFile,
        t: &TensorEntry,
        len: usize,
        buf: &mut TensorBuf,
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if direct_read_min().is_none_or(|min| t.len < min) {
            return false;
        }
        if direct::mostly_uncached(&shard.file, t.offset, t.len) != Some(true) {
            return false;
        }
        let opened = shard
            .direct
            .get_or_init(|| direct::reopen_direct(&shard.file));
        let Some(file) = opened else {
            return false;
        };
        if direct::read_direct_into(file, t.offset, len, buf).is_err() {
            return false;
        }
        self.bytes_read.fetch_add(t.len, Relaxed);
        self.bytes_read_direct.fetch_add(t.len, Relaxed);
        true
    }

    /// Bytes of tensor data read from this checkpoint's files so far, by every thread
    /// ([`read_range`](Self::read_range) and [`read_tensor`](Self::read_tensor)).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Of [`bytes_read`](Self::bytes_read), the bytes read past the page cache.
    pub fn bytes_read_direct(&self) -> u64 {
        self.bytes_read_direct
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Total bytes of tensor data (all tensors, headers excluded).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// The shard of `t`, once `[start, start + len)` is known to lie within `t` and `t` within
    /// its shard's data section.
    fn check_range(&self, t: &TensorEntry, start: u64, len: u64) -> Result<&ShardFile> {
        let Some(shard) = self.shards.get(t.shard) else {
            return Err(Error::tensor(
                &self.path,
                &t.name,
                format!(
                    "shard index {} out of range ({} shards)",
                    t.shard,
                    self.shards.len()
                ),
            ));
        };
        let end = start.checked_add(len);
        if end.is_none_or(|end| end > t.len) {
            return Err(Error::tensor(
                &shard.path,
                &t.name,
                format!(
                    "read of {len} bytes at {start} is past the tensor's {} bytes",
                    t.len
                ),
            ));
        }
        let data_end = shard.data_start + shard.data_len;
        if t.offset < shard.data_start || t.offset.checked_add(t.len).is_none_or(|e| e > data_end) {
            return Err(Error::tensor(
                &shard.path,
                &t.name,
                format!(
                    "bytes [{}, {}) lie outside the file's data section [{}, {data_end})",
                    t.offset,
                    t.offset.saturating_add(t.len),
                    shard.data_start
                ),
            ));
        }
        Ok(shard)
    }
}

/// The final path component (the whole path if it has none), which must be UTF-8: a
/// `.udelta` file stores the names of the fine-tune's files to write them back, as UTF-8.
fn file_name_of(path: &Path) -> Result<String> {
    let name = path.file_name().unwrap_or(path.as_os_str());
    name.to_str().map(str::to_string).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!(
                "the file name {name:?} is not valid UTF-8 (checkpoint file names are stored \
                 as UTF-8): rename the file"
            ),
        )
    })
}

/// Sorted entry names of `dir`. A name that is not UTF-8 is an error if it could be a weight
/// file (its bytes end in `.safetensors` or `.json`), else shown as well as it can be.
fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let bytes = name.as_encoded_bytes();
        if name.to_str().is_none()
            && (bytes.ends_with(b".safetensors") || bytes.ends_with(b".json"))
        {
            file_name_of(&entry.path())?;
        }
        names.push(name.to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `a, b, c` (at most 20 names, then a count).
fn join_names(names: &[&String]) -> String {
    const SHOWN: usize = 20;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... and {} more", names.len() - SHOWN));
    }
    s
}

/// Reads and parses the shard index `path` (see [`parse_shard_index`]), at most
/// [`MAX_SHARD_INDEX_LEN`] bytes of it.
fn read_index(path: &Path) -> Result<(Option<Value>, BTreeMap<String, String>)> {
    let bytes = read_bounded(path, MAX_SHARD_INDEX_LEN, "shard index")?;
    parse_shard_index(path, &bytes)
}

/// The bytes of the regular file `path` (a symbolic link is followed: model caches link every
/// file), refused without reading it when it is larger than `limit` bytes (or grows past it
/// while read) or not a regular file (opened non-blocking, so a FIFO cannot hang the run).
/// `what` names the file in the error.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = crate::special_files::open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    crate::special_files::read_capped(file, len, limit)
        .map_err(|e| Error::io(path, e))?
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("{what} is larger than the limit of {limit} bytes"),
            )
        })
}

/// Parses the bytes of a shard index (`model.safetensors.index.json`; `path` names it in
/// errors): its `"metadata"` value and its `weight_map` (tensor -> shard file name).
pub fn parse_shard_index(
    path: &Path,
    bytes: &[u8],
) -> Result<(Option<Value>, BTreeMap<String, String>)> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::checkpoint(path, format!("shard index is not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(Error::checkpoint(
            path,
            "shard index must be a JSON object with a \"weight_map\"",
        ));
    };
    let Some(map) = obj.remove("weight_map") else {
        return Err(Error::checkpoint(path, "shard index has no \"weight_map\""));
    };
    let Value::Object(map) = map else {
        return Err(Error::checkpoint(
            path,
            "shard index's \"weight_map\" is not an object",
        ));
    };
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let Value::String(shard) = shard else {
            return Err(Error::tensor(
                path,
                &tensor,
                format!("weight_map value {shard} is not a file name string"),
            ));
        };
        weight_map.insert(tensor, shard);
    }
    Ok((obj.remove("metadata"), weight_map))
}

/// Opens one safetensors file and validates its header and data length; returns it with its
/// tensors by offset (ties, between empty tensors, by name).
fn open_shard(path: &Path, file_name: String) -> Result<(ShardFile, Vec<(String, TensorInfo)>)> {
    let file = crate::special_files::open_regular(path)?;
    let header = parse_shard_header(path, &file)?;
    let shard = ShardFile {
        path: path.to_path_buf(),
        file_name,
        metadata: header.metadata,
        data_start: header.data_start,
        data_len: header.data_len,
        file,
        direct: Default::default(),
    };
    Ok((shard, header.tensors))
}

/// The validated header of one safetensors file.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// The header's `__metadata__` map, if it has one.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Absolute offset of the data section: 8 + header length.
    pub data_start: u64,
    /// Length of the data section in bytes, equal to what the header describes.
    pub data_len: u64,
    /// The tensors by offset (ties, between empty tensors, by name); offsets are relative to
    /// `data_start`, contiguous, and end at `data_len`.
    pub tensors: Vec<(String, TensorInfo)>,
}

/// Parses and validates the header of the safetensors file held by `src` (named `path` in
/// errors): header length within [`MAX_HEADER_LEN`] and the file, valid JSON, known dtypes,
/// shapes matching contiguous `data_offsets`, and a data section exactly as long as described.
pub fn parse_shard_header(path: &Path, src: &dyn ByteSource) -> Result<ShardHeader> {
    let file_len = src.size().map_err(|e| Error::io(path, e))?;
    if file_len == 0 {
        return Err(Error::checkpoint(
            path,
            "empty file (0 bytes): not a safetensors file",
        ));
    }
    if file_len < 8 {
        return Err(Error::checkpoint(
            path,
            format!(
                "file is only {file_len} bytes: too short for a safetensors file \
                 (it starts with an 8-byte header length)"
            ),
        ));
    }
    let mut n_bytes = [0u8; 8];
    src.read_exact_at(&mut n_bytes, 0)
        .map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n_bytes);
    if n > MAX_HEADER_LEN {
        return Err(Error::checkpoint(
            path,
            format!(
                "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit: \
                 not a safetensors file, or corrupted"
            ),
        ));
    }
    if n > file_len - 8 {
        return Err(Error::checkpoint(
            path,
            format!(
                "header length {n} runs past the end of the file ({file_len} bytes): \
                 truncated, or not a safetensors file"
            ),
        ));
    }
    let header = src.read_vec_at(8, n).map_err(|e| Error::io(path, e))?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| header_error(path, &header, e))?;
    if let Some(name) = duplicate_key(&header) {
        return Err(Error::tensor(
            path,
            &name,
            "named twice in the header (duplicate tensor names)",
        ));
    }

    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let described = metadata.data_len() as u64;
    if described > data_len {
        return Err(Error::checkpoint(
            path,
            format!(
                "truncated: the header describes {described} bytes of tensor data \
                 but only {data_len} follow it \
                 (expected a {} byte file, found {file_len} bytes; {} missing)",
                data_start + described,
                described - data_len
            ),
        ));
    }
    if described < data_len {
        return Err(Error::checkpoint(
            path,
            format!(
                "{} unexpected bytes after the last tensor: the header describes \
                 {described} bytes of tensor \
                 data but {data_len} follow it (expected a {} byte file, found {file_len} bytes)",
                data_len - described,
                data_start + described
            ),
        ));
    }
    let mut tensors: Vec<(String, TensorInfo)> = metadata
        .offset_keys()
        .into_iter()
        .filter_map(|name| metadata.info(&name).cloned().map(|info| (name, info)))
        .collect();
    tensors.sort_by(|a, b| {
        a.1.data_offsets
            .cmp(&b.1.data_offsets)
            .then_with(|| a.0.cmp(&b.0))
    });
    Ok(ShardHeader {
        metadata: metadata
            .metadata()
            .as_ref()
            .map(|m| m.clone().into_iter().collect()),
        data_start,
        data_len,
        tensors,
    })
}

/// The first key that a JSON object (the header) holds twice: JSON parsers keep one of them
/// silently, so a header naming a tensor twice would otherwise pass.
fn duplicate_key(header: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Keys, A::Error> {
                    // Every entry is consumed: serde_json refuses a map left half-read.
                    let (mut seen, mut first) = (std::collections::HashSet::new(), None);
                    while let Some(k) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        if !seen.insert(k.clone()) && first.is_none() {
                            first = Some(k);
                        }
                    }
                    Ok(Keys(first))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Keys>(header).ok()?.0
}

/// A clear error for a header `serde_json` / `safetensors` rejected.
fn header_error(path: &Path, header: &[u8], e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => {
            Error::checkpoint(path, format!("header is not valid JSON: {e}"))
        }
        Category::Io => Error::checkpoint(path, format!("cannot parse header: {e}")),
        Category::Data => diagnose_header(path, header)
            .unwrap_or_else(|| Error::checkpoint(path, format!("invalid safetensors header: {e}"))),
    }
}

/// Finds which entry of a syntactically valid header is wrong, and says how.
fn diagnose_header(path: &Path, header: &[u8]) -> Option<Error> {
    let value: Value = serde_json::from_slice(header).ok()?;
    let Value::Object(map) = value else {
        return Some(Error::checkpoint(
            path,
            "invalid safetensors header: not a JSON object mapping tensor names \
             to {dtype, shape, data_offsets}",
        ));
    };
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (name, v) in &map {
        if name == "__metadata__" {
            if !matches!(v, Value::Object(m) if m.values().all(Value::is_string)) {
                return Some(Error::checkpoint(
                    path,
                    "invalid safetensors header: __metadata__ must map strings to strings",
                ));
            }
            continue;
        }
        match diagnose_entry(path, name, v) {
            Ok((s, e)) => spans.push((s, e, name)),
            Err(err) => return Some(err),
        }
    }
    diagnose_spans(path, spans)
}

/// The `data_offsets` of one tensor entry of a header, or what is wrong with the entry.
fn diagnose_entry(path: &Path, name: &str, v: &Value) -> Result<(usize, usize)> {
    if let Some(d) = v.get("dtype") {
        if serde_json::from_value::<Dtype>(d.clone()).is_err() {
            return Err(Error::tensor(path, name, format!("unknown dtype {d}")));
        }
    }
    let info: TensorInfo = serde_json::from_value(v.clone())
        .map_err(|e| Error::tensor(path, name, format!("invalid header entry: {e}")))?;
    let (s, e) = info.data_offsets;
    if e < s {
        return Err(Error::tensor(
            path,
            name,
            format!("data_offsets [{s}, {e}] end before they start"),
        ));
    }
    let needed = entry_byte_len(path, name, &info)?;
    if (e - s) as u64 != needed {
        return Err(Error::tensor(
            path,
            name,
            format!(
                "data_offsets [{s}, {e}] span {} bytes but {} with shape {:?} takes {needed}",
                e - s,
                dtype_name(info.dtype),
                info.shape
            ),
        ));
    }
    Ok((s, e))
}

/// The bytes a header entry's dtype and shape take, or why they cannot be stored.
fn entry_byte_len(path: &Path, name: &str, info: &TensorInfo) -> Result<u64> {
    let numel = info
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let bits = numel.and_then(|n| n.checked_mul(info.dtype.bitsize() as u64));
    let Some(bits) = bits else {
        return Err(Error::tensor(
            path,
            name,
            format!("shape {:?} is too large", info.shape),
        ));
    };
    if bits % 8 != 0 {
        return Err(Error::tensor(
            path,
            name,
            format!(
                "{} elements of {} do not fill whole bytes",
                bits / info.dtype.bitsize() as u64,
                dtype_name(info.dtype)
            ),
        ));
    }
    Ok(byte_len(info.dtype, bits / info.dtype.bitsize() as u64))
}

/// The first gap or overlap between the entries' `data_offsets` `(start, end, name)`, which
/// must tile the data section from its start.
fn diagnose_spans(path: &Path, mut spans: Vec<(usize, usize, &str)>) -> Option<Error> {
    spans.sort();
    let mut end = 0;
    let mut prev: Option<&str> = None;
    for (s, e, name) in spans {
        if s != end {
            let after = prev.map_or("the start of the data section".to_string(), |p| {
                format!("tensor '{p}'")
            });
            let msg = if s < end {
                format!("data_offsets [{s}, {e}] overlap {after}, which ends at {end}")
            } else {
                format!(
                    "data_offsets [{s}, {e}] leave a gap of {} bytes after {after} (ends at {end})",
                    s - end
                )
            };
            return Some(Error::tensor(path, name, msg));
        }
        end = e;
        prev = Some(name);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};
    use std::collections::HashMap;
    use std::io::Write;

    /// (name, dtype, shape) of the fixtures' tensors.
    type Spec<'a> = (&'a str, Dtype, &'a [usize]);

    /// Deterministic bytes for a tensor, different for each name.
    fn bytes_for(name: &str, len: u64) -> Vec<u8> {
        let seed = name
            .bytes()
            .fold(17u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        (0..len as u32)
            .map(|i| (seed.wrapping_add(i.wrapping_mul(7)) % 251) as u8)
            .collect()
    }

    /// Writes `tensors` with our writer; returns name -> data.
    fn write_st(
        path: &Path,
        tensors: &[Spec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> HashMap<String, Vec<u8>> {
        let headers: Vec<TensorHeader> = tensors
            .iter()
            .map(|&(name, dtype, shape)| TensorHeader {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
            })
            .collect();
        let mut w = SafetensorsWriter::create(path, &headers, metadata).unwrap();
        let mut out = HashMap::new();
        for h in &headers {
            let data = bytes_for(&h.name, h.byte_len());
            w.write(&data).unwrap();
            out.insert(h.name.clone(), data);
        }
        w.finish().unwrap();
        out
    }

    /// A file made of an 8-byte length `n`, `header` and `data` (which may disagree with `n`).
    fn write_raw(path: &Path, n: u64, header: &[u8], data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(&n.to_le_bytes()).unwrap();
        f.write_all(header).unwrap();
        f.write_all(data).unwrap();
    }

    /// A file with a well-formed length prefix for `header`.
    fn write_header(path: &Path, header: &str, data_len: usize) {
        write_raw(
            path,
            header.len() as u64,
            header.as_bytes(),
            &vec![0u8; data_len],
        );
    }

    fn open_err(path: &Path) -> String {
        match Checkpoint::open(path) {
            Ok(c) => panic!("{} opened: {:?}", path.display(), c.tensors),
            Err(e) => e.to_string(),
        }
    }

    fn assert_contains(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "'{n}' missing from: {msg}");
        }
    }

    const MIXED: &[Spec] = &[
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            &[4, 6],
        ),
        ("model.layers.0.mlp.up_proj.weight", Dtype::BF16, &[6, 3]),
        ("model.norm.weight", Dtype::F32, &[5]),
        ("position_ids", Dtype::I64, &[1, 3]),
        ("empty", Dtype::F32, &[0, 4]),
        ("scalar", Dtype::F32, &[]),
    ];

    fn check_contents(ckpt: &Checkpoint, data: &HashMap<String, Vec<u8>>) {
        assert_eq!(ckpt.tensors.len(), data.len());
        let mut buf = Vec::with_capacity(7);
        for t in &ckpt.tensors {
            let want = &data[&t.name];
            assert_eq!(t.len, want.len() as u64, "{}", t.name);
            assert_eq!(t.len, byte_len(t.dtype, t.numel()));
            ckpt.read_tensor(t, &mut buf).unwrap();
            assert_eq!(&buf, want, "{}", t.name);
            assert_eq!(ckpt.get(&t.name), Some(t));
        }
        assert_eq!(
            ckpt.total_bytes(),
            data.values().map(|d| d.len() as u64).sum::<u64>()
        );
        // ordered by shard, then offset, and contiguous within each shard
        for w in ckpt.tensors.windows(2) {
            assert!((w[0].shard, w[0].offset) <= (w[1].shard, w[1].offset));
            if w[0].shard == w[1].shard {
                assert_eq!(w[0].offset + w[0].len, w[1].offset);
            }
        }
    }

    #[test]
    fn single_file_all_dtypes_reads_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ft.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let data = write_st(&path, MIXED, Some(&meta));
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.layout, Layout::SingleFile);
        assert_eq!(ckpt.path, path);
        assert_eq!(ckpt.shards.len(), 1);
        assert_eq!(ckpt.shards[0].file_name, "ft.safetensors");
        assert_eq!(ckpt.shards[0].metadata.as_ref(), Some(&meta));
        assert_eq!(ckpt.shards[0].data_start % 8, 0);
        assert!(ckpt.index_metadata.is_none() && ckpt.index_path.is_none());
        check_contents(&ckpt, &data);
        // the writer's order is the offset order
        let names: Vec<&str> = ckpt.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, MIXED.iter().map(|s| s.0).collect::<Vec<_>>());
        assert_eq!(ckpt.tensors[0].offset, ckpt.shards[0].data_start);

        let q = ckpt.get("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(
            (q.dtype, q.shape.as_slice(), q.numel(), q.len),
            (Dtype::F16, &[4, 6][..], 24, 48)
        );
        assert_eq!(q.float_type(), Some(FloatType::F16));
        assert_eq!(
            ckpt.get("model.layers.0.mlp.up_proj.weight")
                .unwrap()
                .float_type(),
            Some(FloatType::BF16)
        );
        assert_eq!(
            ckpt.get("model.norm.weight").unwrap().float_type(),
            Some(FloatType::F32)
        );
        assert_eq!(ckpt.get("position_ids").unwrap().float_type(), None);
        assert_eq!(ckpt.get("scalar").unwrap().numel(), 1);
        assert_eq!(ckpt.get("empty").unwrap().numel(), 0);
        assert!(ckpt.get("nope").is_none());
        assert_eq!(ckpt.shard_path(q), path);
        assert_eq!(ckpt.shard_tensors(0).len(), MIXED.len());
        assert!(ckpt.shard_tensors(1).is_empty());

        // ranges: exact bytes, bounds checked (error names file and tensor), empty reads fine
        let want = &data[&q.name];
        let mut part = [0u8; 10];
        ckpt.read_range(q, 38, &mut part).unwrap();
        assert_eq!(&part[..], &want[38..48]);
        ckpt.read_range(q, 48, &mut []).unwrap();
        for (start, len) in [(39, 10), (49, 0), (u64::MAX, 1)] {
            let err = ckpt
                .read_range(q, start, &mut vec![0; len])
                .unwrap_err()
                .to_string();
            assert_contains(&err, &["ft.safetensors", "q_proj"]);
        }
        // a bogus entry is an error, not a panic
        let mut bogus = q.clone();
        bogus.shard = 3;
        assert!(ckpt.read_tensor(&bogus, &mut Vec::new()).is_err());
        bogus.shard = 0;
        bogus.offset = 1 << 40;
        assert_contains(
            &ckpt
                .read_tensor(&bogus, &mut Vec::new())
                .unwrap_err()
                .to_string(),
            &["outside"],
        );
        // checked before the buffer is sized: no 32 TiB allocation
        bogus.offset = q.offset;
        bogus.len = 1 << 45;
        let err = ckpt
            .read_tensor(&bogus, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert_contains(&err, &["ft.safetensors", "q_proj", "outside"]);
    }

    #[test]
    fn file_written_by_the_safetensors_crate() {
        use safetensors::tensor::TensorView;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        let data: HashMap<String, Vec<u8>> = MIXED
            .iter()
            .map(|&(n, d, s)| {
                (
                    n.to_string(),
                    bytes_for(n, byte_len(d, s.iter().map(|&x| x as u64).product())),
                )
            })
            .collect();
        let views: Vec<(&str, TensorView)> = MIXED
            .iter()
            .map(|&(n, d, s)| (n, TensorView::new(d, s.to_vec(), &data[n]).unwrap()))
            .collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &path).unwrap();

        let ckpt = Checkpoint::open(&path).unwrap();
        check_contents(&ckpt, &data);
        assert_eq!(ckpt.shards[0].metadata.as_ref().unwrap()["format"], "pt");
        // agrees entry by entry with the crate's own parser
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &ckpt.tensors {
            let view = st.tensor(&t.name).unwrap();
            assert_eq!((view.dtype(), view.shape()), (t.dtype, t.shape.as_slice()));
            let s = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            if t.len > 0 {
                assert_eq!(s as u64, t.offset, "{}", t.name);
            }
        }
    }

    #[test]
    fn hf_directory_with_model_safetensors_or_one_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let data = write_st(&dir.path().join("model.safetensors"), MIXED, None);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.layout, Layout::Directory);
        assert_eq!(ckpt.path, dir.path());
        assert_eq!(ckpt.shards[0].file_name, "model.safetensors");
        assert!(ckpt.shards[0].metadata.is_none());
        check_contents(&ckpt, &data);

        // model.safetensors wins over other files
        write_st(&dir.path().join("other.safetensors"), &MIXED[..1], None);
        assert_eq!(
            Checkpoint::open(dir.path()).unwrap().shards[0].file_name,
            "model.safetensors"
        );

        // no model.safetensors, one other file: that one
        let dir = tempfile::tempdir().unwrap();
        let data = write_st(
            &dir.path().join("adapter_model.safetensors"),
            &MIXED[2..4],
            None,
        );
        std::fs::write(dir.path().join("README.md"), "hi").unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            (ckpt.layout, ckpt.shards[0].file_name.as_str()),
            (Layout::Directory, "adapter_model.safetensors")
        );
        check_contents(&ckpt, &data);
    }

    /// Two shards and an index in `dir`; returns the data of every tensor.
    fn write_sharded(dir: &Path) -> HashMap<String, Vec<u8>> {
        let s1: &[Spec] = &MIXED[..3];
        let s2: &[Spec] = &MIXED[3..];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut data = write_st(
            &dir.join("model-00001-of-00002.safetensors"),
            s1,
            Some(&meta),
        );
        data.extend(write_st(
            &dir.join("model-00002-of-00002.safetensors"),
            s2,
            None,
        ));
        let mut weight_map = serde_json::Map::new();
        for (specs, file) in [
            (s1, "model-00001-of-00002.safetensors"),
            (s2, "model-00002-of-00002.safetensors"),
        ] {
            for s in specs {
                weight_map.insert(s.0.to_string(), file.into());
            }
        }
        let total: usize = data.values().map(Vec::len).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE_NAME), index.to_string()).unwrap();
        data
    }

    #[test]
    fn sharded_checkpoint_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let data = write_sharded(dir.path());
        for path in [dir.path().to_path_buf(), dir.path().join(INDEX_FILE_NAME)] {
            let ckpt = Checkpoint::open(&path).unwrap();
            assert_eq!(ckpt.layout, Layout::Sharded);
            assert_eq!(ckpt.path, path);
            assert_eq!(
                ckpt.index_path.as_deref(),
                Some(dir.path().join(INDEX_FILE_NAME).as_path())
            );
            let names: Vec<&str> = ckpt.shards.iter().map(|s| s.file_name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"
                ]
            );
            assert_eq!(ckpt.shards[0].metadata.as_ref().unwrap()["format"], "pt");
            assert!(ckpt.shards[1].metadata.is_none());
            let total = data.values().map(Vec::len).sum::<usize>() as u64;
            assert_eq!(
                ckpt.index_metadata,
                Some(serde_json::json!({"total_size": total}))
            );
            check_contents(&ckpt, &data);
            assert_eq!(ckpt.shard_tensors(0).len(), 3);
            assert_eq!(ckpt.shard_tensors(1).len(), 3);
            let t = ckpt.get("position_ids").unwrap();
            assert_eq!(t.shard, 1);
            assert_eq!(
                ckpt.shard_path(t),
                dir.path().join("model-00002-of-00002.safetensors")
            );
        }
    }

    #[test]
    fn parallel_reads_through_shared_ref() {
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<Checkpoint>();
        let dir = tempfile::tempdir().unwrap();
        let data = write_sharded(dir.path());
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for k in 0..4 {
                let (ckpt, data) = (&ckpt, &data);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    for round in 0..50 {
                        let t = &ckpt.tensors[(k + round) % ckpt.tensors.len()];
                        ckpt.read_tensor(t, &mut buf).unwrap();
                        assert_eq!(&buf, &data[&t.name]);
                    }
                });
            }
        });
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);

        assert_contains(
            &open_err(&p("missing.safetensors")),
            &["missing.safetensors"],
        );

        std::fs::write(p("empty.safetensors"), b"").unwrap();
        assert_contains(
            &open_err(&p("empty.safetensors")),
            &["empty.safetensors", "empty file"],
        );

        std::fs::write(p("three.safetensors"), b"abc").unwrap();
        assert_contains(
            &open_err(&p("three.safetensors")),
            &["three.safetensors", "3 bytes"],
        );

        write_raw(&p("huge.safetensors"), u64::MAX, b"{}", &[]);
        assert_contains(
            &open_err(&p("huge.safetensors")),
            &["huge.safetensors", "header length"],
        );

        write_raw(&p("past.safetensors"), 100, b"{}", &[0; 10]);
        assert_contains(
            &open_err(&p("past.safetensors")),
            &["past.safetensors", "past the end", "20 bytes"],
        );

        write_header(&p("notjson.safetensors"), "this is not json", 0);
        assert_contains(
            &open_err(&p("notjson.safetensors")),
            &["notjson.safetensors", "not valid JSON"],
        );

        write_raw(&p("zero.safetensors"), 0, b"", &[]);
        assert_contains(
            &open_err(&p("zero.safetensors")),
            &["zero.safetensors", "not valid JSON"],
        );

        write_header(&p("array.safetensors"), "[1, 2]", 0);
        assert_contains(
            &open_err(&p("array.safetensors")),
            &["array.safetensors", "JSON object"],
        );

        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                          "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        write_header(&p("overlap.safetensors"), overlap, 12);
        assert_contains(
            &open_err(&p("overlap.safetensors")),
            &["overlap.safetensors", "'b'", "overlap"],
        );

        let gap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                      "b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
        write_header(&p("gap.safetensors"), gap, 20);
        assert_contains(
            &open_err(&p("gap.safetensors")),
            &["gap.safetensors", "'b'", "gap of 4 bytes"],
        );

        let reversed = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#;
        write_header(&p("reversed.safetensors"), reversed, 8);
        assert_contains(
            &open_err(&p("reversed.safetensors")),
            &["reversed.safetensors", "'a'", "end before"],
        );

        let wrong_size = r#"{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#;
        write_header(&p("size.safetensors"), wrong_size, 8);
        assert_contains(
            &open_err(&p("size.safetensors")),
            &["size.safetensors", "'w'", "[3]", "takes 6"],
        );

        let dtype = r#"{"w":{"dtype":"F17","shape":[2],"data_offsets":[0,4]}}"#;
        write_header(&p("dtype.safetensors"), dtype, 4);
        assert_contains(
            &open_err(&p("dtype.safetensors")),
            &["dtype.safetensors", "'w'", "unknown dtype", "F17"],
        );

        let no_shape = r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#;
        write_header(&p("noshape.safetensors"), no_shape, 4);
        assert_contains(
            &open_err(&p("noshape.safetensors")),
            &["noshape.safetensors", "'w'", "shape"],
        );

        let bad_meta = r#"{"__metadata__":{"n":1}}"#;
        write_header(&p("meta.safetensors"), bad_meta, 0);
        assert_contains(
            &open_err(&p("meta.safetensors")),
            &["meta.safetensors", "__metadata__"],
        );

        // listed out of offset order but contiguous: valid
        let unordered = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},
                            "a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        write_header(&p("unordered.safetensors"), unordered, 16);
        let ckpt = Checkpoint::open(&p("unordered.safetensors")).unwrap();
        assert_eq!(
            ckpt.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );

        // data truncated by a few bytes, or followed by extra ones
        write_st(&p("trunc.safetensors"), MIXED, None);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p("trunc.safetensors"))
            .unwrap();
        let full = f.metadata().unwrap().len();
        f.set_len(full - 3).unwrap();
        let err = open_err(&p("trunc.safetensors"));
        assert_contains(
            &err,
            &[
                "trunc.safetensors",
                "truncated",
                &format!("{full}"),
                &format!("{}", full - 3),
            ],
        );
        f.set_len(full + 5).unwrap();
        assert_contains(
            &open_err(&p("trunc.safetensors")),
            &["trunc.safetensors", "5 unexpected bytes"],
        );
    }

    #[test]
    fn file_shrinking_after_open_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinks.safetensors");
        write_st(&path, MIXED, None);
        let ckpt = Checkpoint::open(&path).unwrap();
        let t = ckpt.get("model.layers.0.mlp.up_proj.weight").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(t.offset + 2)
            .unwrap();
        let err = ckpt
            .read_tensor(t, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert_contains(
            &err,
            &[
                "shrinks.safetensors",
                "up_proj",
                "truncated after it was opened",
            ],
        );
    }

    /// Rewrites the shard index of `dir` with `f`.
    fn edit_index(dir: &Path, f: impl FnOnce(&mut Value)) {
        let path = dir.join(INDEX_FILE_NAME);
        let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut index);
        std::fs::write(&path, index.to_string()).unwrap();
    }

    /// The fixture of [`write_sharded`] with its index edited by `f`.
    fn sharded_with_index(f: impl FnOnce(&mut Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        edit_index(dir.path(), f);
        dir
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &[
                "model-00002-of-00002.safetensors",
                "does not exist",
                "'empty'",
            ],
        );
    }

    #[test]
    fn an_index_naming_a_tensor_absent_from_its_shard_is_an_error() {
        let dir = sharded_with_index(|v| {
            v["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into()
        });
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &[
                "model-00001-of-00002.safetensors",
                "'ghost.weight'",
                "absent",
            ],
        );
    }

    #[test]
    fn an_index_putting_a_tensor_in_the_wrong_shard_is_an_error() {
        let dir = sharded_with_index(|v| {
            v["weight_map"]["scalar"] = "model-00001-of-00002.safetensors".into()
        });
        let err = open_err(dir.path());
        assert_contains(&err, &["model-00002-of-00002.safetensors", "'scalar'"]);
    }

    #[test]
    fn a_tensor_missing_from_the_index_is_an_error() {
        let dir = sharded_with_index(|v| {
            v["weight_map"].as_object_mut().unwrap().remove("scalar");
        });
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &["model-00002-of-00002.safetensors", "'scalar'", "not listed"],
        );
    }

    #[test]
    fn a_tensor_in_two_shards_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        Checkpoint::open(dir.path()).unwrap();
        write_st(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &MIXED[2..],
            None,
        );
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &[
                "model-00002-of-00002.safetensors",
                "'model.norm.weight'",
                "model-00001-of-00002",
            ],
        );
    }

    #[test]
    fn shard_names_must_stay_in_the_directory() {
        let dir = sharded_with_index(|v| {
            v["weight_map"]["scalar"] = "../model-00002-of-00002.safetensors".into()
        });
        assert_contains(
            &open_err(dir.path()),
            &[INDEX_FILE_NAME, "'scalar'", "plain file name"],
        );
    }

    #[test]
    fn broken_index_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        for (text, needle) in [
            ("{not json", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"metadata": {}}"#, "no \"weight_map\""),
            (r#"{"weight_map": []}"#, "not an object"),
            (r#"{"weight_map": {"a": 3}}"#, "'a'"),
        ] {
            std::fs::write(dir.path().join(INDEX_FILE_NAME), text).unwrap();
            assert_contains(&open_err(dir.path()), &[INDEX_FILE_NAME, needle]);
        }
    }

    #[test]
    fn an_oversized_or_special_index_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        let index = dir.path().join(INDEX_FILE_NAME);
        // A sparse file one byte over the limit: refused from its size, nothing read.
        std::fs::File::create(&index)
            .unwrap()
            .set_len(MAX_SHARD_INDEX_LEN + 1)
            .unwrap();
        let limit = format!("limit of {MAX_SHARD_INDEX_LEN} bytes");
        assert_contains(&open_err(dir.path()), &[INDEX_FILE_NAME, &limit]);
        // A FIFO with no writer, given as the index, would block a plain open: refused at once.
        std::fs::remove_file(&index).unwrap();
        let c = std::ffi::CString::new(index.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_contains(&open_err(&index), &[INDEX_FILE_NAME, "not a regular file"]);
        // At the limit exactly, the file is read (and then parsed: zeros are not JSON).
        std::fs::remove_file(&index).unwrap();
        std::fs::File::create(&index)
            .unwrap()
            .set_len(MAX_SHARD_INDEX_LEN)
            .unwrap();
        assert_contains(&open_err(dir.path()), &[INDEX_FILE_NAME, "not valid JSON"]);
    }

    #[test]
    fn checkpoint_file_names_that_are_not_utf8_are_refused_saying_so() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"w\xff.safetensors");
        write_st(&dir.path().join(name), &MIXED[..2], None);
        let needles = ["\"w\\xFF.safetensors\" is not valid UTF-8", "rename"];
        // Given as the file, or found in the directory: the same refusal.
        assert_contains(&open_err(&dir.path().join(name)), &needles);
        assert_contains(&open_err(dir.path()), &needles);
        // A name that cannot be a weight file does not matter (the directory is listed).
        std::fs::rename(dir.path().join(name), dir.path().join("a.safetensors")).unwrap();
        std::fs::write(
            dir.path()
                .join(std::ffi::OsStr::from_bytes(b"notes\xff.txt")),
            "",
        )
        .unwrap();
        Checkpoint::open(dir.path()).unwrap();
    }

    #[test]
    fn a_directory_without_a_checkpoint_lists_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        assert_contains(
            &open_err(dir.path()),
            &["no safetensors checkpoint", "found: nothing"],
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), "x").unwrap();
        let dir_name = dir.path().file_name().unwrap().to_str().unwrap();
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &[
                dir_name,
                "no safetensors checkpoint",
                "config.json, pytorch_model.bin",
            ],
        );

        // two unrelated files and no index
        write_st(&dir.path().join("a.safetensors"), &MIXED[..1], None);
        write_st(&dir.path().join("b.safetensors"), &MIXED[1..2], None);
        let err = open_err(dir.path());
        assert_contains(
            &err,
            &[
                dir_name,
                "2 safetensors files",
                "a.safetensors, b.safetensors",
                "index",
            ],
        );
    }

    #[test]
    fn a_bad_file_inside_a_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
        assert_contains(&open_err(dir.path()), &["model.safetensors", "3 bytes"]);
    }

    #[test]
    fn index_of_finds_every_tensor_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        for (i, t) in ckpt.tensors.iter().enumerate() {
            assert_eq!(ckpt.index_of(&t.name), Some(i), "{}", t.name);
        }
        assert_eq!(ckpt.index_of("ghost.weight"), None);
    }
}
