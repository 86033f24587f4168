//! Streaming safetensors writer: the header first (all offsets are known from shapes and
//! dtypes), then the tensors' bytes in order, so no tensor need be held whole in memory.

use super::dtype::{byte_len, Dtype};
use crate::error::{Error, Result};
use crate::limits::MAX_SAFETENSORS_HEADER_LEN as MAX_HEADER_LEN;
use crate::staging::DurableFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name, dtype and shape of one tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
}

impl TensorHeader {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    /// Bytes of data.
    pub fn byte_len(&self) -> u64 {
        byte_len(self.dtype, self.numel())
    }
}

/// Writes one safetensors file tensor by tensor.
pub struct SafetensorsWriter {
    out: DurableFile,
    path: PathBuf,
    names: Vec<String>,
    sizes: Vec<u64>,
    current: usize,
    written: u64,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors`, whose data must then be written in
    /// this order with [`write`](Self::write).
    pub fn create(
        path: &Path,
        tensors: &[TensorHeader],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        let header =
            writable_header(tensors, metadata).map_err(|why| Error::checkpoint(path, why))?;
        let mut padded = header.into_bytes();
        while padded.len() % 8 != 0 {
            padded.push(b' ');
        }
        let mut out = DurableFile::create(path, path)?;
        out.write(&(padded.len() as u64).to_le_bytes())?;
        out.write(&padded)?;
        Ok(SafetensorsWriter {
            out,
            path: path.to_path_buf(),
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            sizes: tensors.iter().map(TensorHeader::byte_len).collect(),
            current: 0,
            written: 0,
        })
    }

    /// Appends data bytes; a call may span several tensors. Writing more than the header
    /// announced is an error.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            self.skip_full();
            let Some(&size) = self.sizes.get(self.current) else {
                return Err(Error::checkpoint(
                    &self.path,
                    "more tensor data than the header announced",
                ));
            };
            let take = ((size - self.written) as usize).min(bytes.len());
            self.out.write(&bytes[..take])?;
            self.written += take as u64;
            bytes = &bytes[take..];
        }
        Ok(())
    }

    fn skip_full(&mut self) {
        while self.current < self.sizes.len() && self.written == self.sizes[self.current] {
            self.current += 1;
            self.written = 0;
        }
    }

    /// Flushes and syncs; fails if some tensor's data is missing.
    pub fn finish(mut self) -> Result<()> {
        self.skip_full();
        if self.current < self.sizes.len() {
            return Err(Error::tensor(
                &self.path,
                &self.names[self.current],
                "data incomplete",
            ));
        }
        self.out.finish()
    }
}

/// The name safetensors reserves for a file's metadata, which no tensor may have.
pub const METADATA_KEY: &str = "__metadata__";

/// The JSON header of a safetensors file holding `tensors` (with `metadata`), or what makes
/// such a file unreadable: a tensor named twice, a tensor named [`METADATA_KEY`], or a header
/// longer than readers accept ([`MAX_HEADER_LEN`]).
pub fn writable_header(
    tensors: &[TensorHeader],
    metadata: Option<&BTreeMap<String, String>>,
) -> std::result::Result<String, String> {
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(format!(
                "tensor '{METADATA_KEY}': the name is reserved for the file's metadata"
            ));
        }
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor '{}': listed twice", t.name));
        }
    }
    let header = header_json(tensors, metadata);
    if header.len() as u64 > MAX_HEADER_LEN {
        return Err(format!(
            "a safetensors header of {} bytes, over the {MAX_HEADER_LEN} bytes readers accept",
            header.len()
        ));
    }
    Ok(header)
}

/// The JSON header for `tensors` laid out contiguously in the given order.
fn header_json(tensors: &[TensorHeader], metadata: Option<&BTreeMap<String, String>>) -> String {
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        map.insert(
            METADATA_KEY.into(),
            serde_json::to_value(m).unwrap_or_default(),
        );
    }
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.byte_len();
        map.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn written_file_loads_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            TensorHeader {
                name: "b".into(),
                dtype: Dtype::F16,
                shape: vec![2, 3],
            },
            TensorHeader {
                name: "a".into(),
                dtype: Dtype::I64,
                shape: vec![1],
            },
            TensorHeader {
                name: "empty".into(),
                dtype: Dtype::F32,
                shape: vec![0, 4],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut w = SafetensorsWriter::create(&path, &tensors, Some(&meta)).unwrap();
        let data: Vec<u8> = (0u8..20).collect();
        w.write(&data[..5]).unwrap();
        w.write(&data[5..]).unwrap();
        assert!(w.write(&[0]).is_err());
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &data[..12]);
        assert_eq!(st.tensor("a").unwrap().data(), &data[12..20]);
        assert_eq!(st.tensor("empty").unwrap().shape(), &[0, 4]);
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(md.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn headers_the_readers_would_refuse_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = |name: &str| TensorHeader {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![1],
        };
        // The header of one tensor named n bytes: n + this many bytes of JSON.
        let overhead = header_json(&[t("")], None).len() as u64;
        let at_limit = "x".repeat((MAX_HEADER_LEN - overhead) as usize);
        assert_eq!(
            header_json(&[t(&at_limit)], None).len() as u64,
            MAX_HEADER_LEN
        );
        writable_header(&[t(&at_limit)], None).unwrap();
        let over = format!("{at_limit}x");
        for (tensors, needle) in [
            (vec![t("a"), t("b"), t("a")], "tensor 'a': listed twice"),
            (
                vec![t("a"), t(METADATA_KEY)],
                "reserved for the file's metadata",
            ),
            (vec![t(&over)], "over the 100000000 bytes readers accept"),
        ] {
            let err = match SafetensorsWriter::create(&path, &tensors, None) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{needle}: written"),
            };
            assert!(
                err.contains(needle) && err.contains("t.safetensors"),
                "{err}"
            );
            assert!(!path.exists(), "{needle}: a file was created");
        }
    }

    #[test]
    fn missing_data_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![TensorHeader {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        }];
        let mut w = SafetensorsWriter::create(&path, &tensors, None).unwrap();
        w.write(&[0; 4]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("incomplete"), "{err}");
    }
}
