//! Reading and writing datasets: JSON Lines (ours), JSON arrays (the reference's files), and
//! either one compressed with zstd when the path ends in `.zst`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
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
pub fn read_items<T: DeserializeOwned + Send>(path: &Path) -> Result<Vec<T>, DataError> {
    let mut items = Vec::new();
    for_each_chunk(path, CHUNK, |chunk| items.extend(chunk))?;
    Ok(items)
}

/// Items per chunk when a whole file is read ([`read_items`]) or streamed by the commands: enough
/// to keep every core parsing, little memory.
pub const CHUNK: usize = 4096;

/// Calls `each` with consecutive chunks of at most `chunk` items of a JSONL file or a JSON array
/// file (optionally `.zst`), in file order, and returns how many items there were. Only one chunk
/// is held at a time, so files larger than memory (the reference's 13.5 GB trace release) can be
/// validated or summarised. JSON Lines are parsed in parallel within a chunk.
pub fn for_each_chunk<T: DeserializeOwned + Send>(
    path: &Path,
    chunk: usize,
    mut each: impl FnMut(Vec<T>),
) -> Result<usize, DataError> {
    try_for_each_chunk(path, chunk, |items| {
        each(items);
        ControlFlow::Continue(())
    })
}

/// [`for_each_chunk`] that stops reading after the chunk for which `each` returns
/// [`ControlFlow::Break`] (e.g. once its output can no longer be written); returns how many items
/// were handed to `each`.
pub fn try_for_each_chunk<T: DeserializeOwned + Send>(
    path: &Path,
    chunk: usize,
    mut each: impl FnMut(Vec<T>) -> ControlFlow<()>,
) -> Result<usize, DataError> {
    let chunk = chunk.max(1);
    let mut reader = open_reader(path)?;
    // Peek at the first non-blank byte to tell an array from JSON Lines.
    let first = loop {
        let buf = reader.fill_buf().map_err(io_err(path))?;
        if buf.is_empty() {
            return Ok(0);
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
    let parse_error = |line: usize, e: serde_json::Error| DataError::Parse {
        path: path.to_owned(),
        line,
        message: e.to_string(),
    };
    if first == b'[' {
        let mut de = serde_json::Deserializer::from_reader(reader);
        let (mut handed, mut stopped) = (0, false);
        let parsed = serde::Deserializer::deserialize_seq(
            &mut de,
            ArrayChunks {
                chunk,
                each: &mut each,
                handed: &mut handed,
                stopped: &mut stopped,
                _item: PhantomData,
            },
        );
        if stopped {
            return Ok(handed);
        }
        parsed
            .and_then(|()| de.end())
            .map_err(|e| parse_error(e.line(), e))?;
        return Ok(handed);
    }
    let mut count = 0;
    let mut lines: Vec<(usize, String)> = Vec::with_capacity(chunk);
    let mut flush = |lines: &mut Vec<(usize, String)>| -> Result<ControlFlow<()>, DataError> {
        let items = lines
            .par_iter()
            .map(|(number, line)| serde_json::from_str(line).map_err(|e| parse_error(*number, e)))
            .collect::<Result<Vec<T>, _>>()?;
        lines.clear();
        count += items.len();
        Ok(each(items))
    };
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        lines.push((i + 1, line));
        if lines.len() == chunk && flush(&mut lines)?.is_break() {
            return Ok(count);
        }
    }
    if !lines.is_empty() {
        // The last chunk: there is nothing left to stop reading.
        let _ = flush(&mut lines)?;
    }
    Ok(count)
}

/// Visits a JSON array element by element, handing out chunks as they fill. A `Break` from
/// `each` sets `stopped` and ends the visit with an error the caller discards.
struct ArrayChunks<'a, T, F> {
    chunk: usize,
    each: &'a mut F,
    handed: &'a mut usize,
    stopped: &'a mut bool,
    _item: PhantomData<T>,
}

impl<T, F: FnMut(Vec<T>) -> ControlFlow<()>> ArrayChunks<'_, T, F> {
    fn hand<E: serde::de::Error>(&mut self, items: Vec<T>) -> Result<(), E> {
        *self.handed += items.len();
        if (self.each)(items).is_break() {
            *self.stopped = true;
            return Err(E::custom("stopped by the caller"));
        }
        Ok(())
    }
}

impl<'de, T: DeserializeOwned, F: FnMut(Vec<T>) -> ControlFlow<()>> Visitor<'de>
    for ArrayChunks<'_, T, F>
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut items = Vec::with_capacity(self.chunk.min(CHUNK));
        while let Some(item) = seq.next_element::<T>()? {
            items.push(item);
            if items.len() == self.chunk {
                self.hand(std::mem::take(&mut items))?;
            }
        }
        if !items.is_empty() {
            self.hand(items)?;
        }
        Ok(())
    }
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
    /// Creates the writer (and the parent directory). A path that is a directory is refused
    /// before anything is written.
    pub fn create(path: &Path) -> Result<Self, DataError> {
        if path.is_dir() {
            return Err(io_err(path)(std::io::Error::other(
                "is a directory; --out names a file",
            )));
        }
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
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(io_err(&self.path)(e));
        }
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

/// Refuses an output that is one of the inputs (same canonical path, or the same file under
/// another name): writing it would replace what is being read.
pub fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<(), DataError> {
    let Ok(out_meta) = std::fs::metadata(out) else {
        return Ok(()); // a new file cannot be an input
    };
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    for input in inputs {
        let same_path = canonical(out).is_some() && canonical(out) == canonical(input);
        #[cfg(unix)]
        let same_file = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(input)
                .is_ok_and(|m| m.dev() == out_meta.dev() && m.ino() == out_meta.ino())
        };
        #[cfg(not(unix))]
        let same_file = false;
        if same_path || same_file {
            return Err(io_err(out)(std::io::Error::other(format!(
                "is also the input {}; writing it would destroy what is being read",
                input.display()
            ))));
        }
    }
    let _ = out_meta;
    Ok(())
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
    fn chunks_keep_file_order_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<Problem> = (1..=10)
            .map(|i| Problem::solved(vec![i, 1, 2], i + 3).unwrap())
            .collect();
        let lines = dir.path().join("p.jsonl.zst");
        write_items(&lines, &items).unwrap();
        let array = dir.path().join("p.json");
        std::fs::write(&array, serde_json::to_string(&items).unwrap()).unwrap();
        for path in [lines, array] {
            let mut chunks = Vec::new();
            let count = for_each_chunk(&path, 4, |c: Vec<Problem>| chunks.push(c)).unwrap();
            assert_eq!(count, 10);
            assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
            assert_eq!(chunks.concat(), items, "{}", path.display());
            // Stopping after the second chunk reads no further.
            let mut seen = Vec::new();
            let handed = try_for_each_chunk(&path, 4, |c: Vec<Problem>| {
                seen.push(c.len());
                if seen.len() == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
            assert_eq!((handed, seen), (8, vec![4, 4]), "{}", path.display());
        }
    }

    #[test]
    fn a_bad_array_element_or_trailing_text_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(
            &path,
            "[{\"nums\": [1, 2, 3], \"target\": 6},\n {\"nums\": 5}]",
        )
        .unwrap();
        let err = read_items::<Problem>(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
        std::fs::write(&path, "[{\"nums\": [1, 2, 3], \"target\": 6}] x").unwrap();
        assert!(read_items::<Problem>(&path).is_err());
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
