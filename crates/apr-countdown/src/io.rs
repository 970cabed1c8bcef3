//! Reading and writing datasets: JSON Lines (ours), JSON arrays (the reference's files), and
//! either one compressed with zstd when the path ends in `.zst`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A dataset file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line or the array is not valid JSON of the expected shape.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (JSONL) or 1 for a JSON array.
        line: usize,
        /// What serde said.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_owned(),
        source,
    }
}

fn open_reader(path: &Path) -> Result<Box<dyn BufRead>, DataError> {
    let file = File::open(path).map_err(io_err(path))?;
    if path.extension().is_some_and(|e| e == "zst") {
        let decoder = zstd::Decoder::new(file).map_err(io_err(path))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, decoder)))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }
}

/// Reads every item of a JSONL file or a JSON array file (optionally `.zst`).
pub fn read_items<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, DataError> {
    let mut reader = open_reader(path)?;
    // Peek at the first non-blank byte to tell an array from JSON Lines.
    let first = loop {
        let buf = reader.fill_buf().map_err(io_err(path))?;
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                reader.consume(i);
                break b;
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == b'[' {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(io_err(path))?;
        return serde_json::from_str(&text).map_err(|e| DataError::Parse {
            path: path.to_owned(),
            line: e.line(),
            message: e.to_string(),
        });
    }
    let mut items = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line).map_err(|e| DataError::Parse {
            path: path.to_owned(),
            line: i + 1,
            message: e.to_string(),
        })?;
        items.push(item);
    }
    Ok(items)
}

/// Writes JSON Lines to a file (zstd-compressed when the path ends in `.zst`). The file appears
/// under its name only once complete: it is written to a temporary name and renamed.
pub struct JsonlWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<Box<dyn Write>>,
    bytes: u64,
}

impl JsonlWriter {
    /// Creates the writer (and the parent directory).
    pub fn create(path: &Path) -> Result<Self, DataError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let out: Box<dyn Write> = if path.extension().is_some_and(|e| e == "zst") {
            let mut enc = zstd::Encoder::new(file, 3).map_err(io_err(path))?;
            // Two compression workers keep up with generation on this class of machine.
            let _ = enc.multithread(2);
            Box::new(BufWriter::with_capacity(1 << 20, enc.auto_finish()))
        } else {
            Box::new(BufWriter::with_capacity(1 << 20, file))
        };
        Ok(JsonlWriter {
            path: path.to_owned(),
            tmp,
            out: Some(out),
            bytes: 0,
        })
    }

    /// Appends one item as a line.
    pub fn write<T: Serialize>(&mut self, item: &T) -> Result<(), DataError> {
        let line = serde_json::to_vec(item).map_err(|e| DataError::Parse {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(&line).map_err(io_err(&self.tmp))?;
        out.write_all(b"\n").map_err(io_err(&self.tmp))?;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    /// Appends bytes that already hold whole JSON lines (each ending in `\n`).
    pub fn write_raw(&mut self, lines: &[u8]) -> Result<(), DataError> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(lines).map_err(io_err(&self.tmp))?;
        self.bytes += lines.len() as u64;
        Ok(())
    }

    /// Uncompressed bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes, closes and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf, DataError> {
        if let Some(mut out) = self.out.take() {
            out.flush().map_err(io_err(&self.tmp))?;
            drop(out); // finishes the zstd frame
        }
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        Ok(self.path.clone())
    }
}

impl Drop for JsonlWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            // Not finished (an error or a panic): leave no half-written file behind.
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes all items as JSON Lines.
pub fn write_items<T: Serialize>(path: &Path, items: &[T]) -> Result<u64, DataError> {
    let mut w = JsonlWriter::create(path)?;
    for item in items {
        w.write(item)?;
    }
    let bytes = w.bytes();
    w.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Problem;

    #[test]
    fn jsonl_zstd_and_json_arrays_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let items = vec![
            Problem::solved(vec![22, 26, 31, 53], 27).unwrap(),
            Problem::solved(vec![1, 2, 3], 6).unwrap(),
        ];
        for name in ["p.jsonl", "p.jsonl.zst"] {
            let path = dir.path().join(name);
            write_items(&path, &items).unwrap();
            assert_eq!(read_items::<Problem>(&path).unwrap(), items);
        }
        let array = dir.path().join("p.json");
        std::fs::write(&array, serde_json::to_string_pretty(&items).unwrap()).unwrap();
        assert_eq!(read_items::<Problem>(&array).unwrap(), items);
    }

    #[test]
    fn bad_json_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"nums\": [1, 2, 3], \"target\": 6}\n{oops\n").unwrap();
        let err = read_items::<Problem>(&path).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2:"), "{err}");
    }
}
