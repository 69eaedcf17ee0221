//! Log shipping: follow a file and deliver its lines in batches. The file itself is the
//! buffer: the read position advances only after the allocator acknowledged a batch, so a
//! failed post sends the same batch again and memory stays bounded by one batch.

use std::io::SeekFrom;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Most bytes read for one batch.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// A file being followed.
#[derive(Debug)]
pub struct FileTail {
    path: PathBuf,
    offset: u64,
}

/// Complete lines read from a [`FileTail`], not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The lines, without their `\n`.
    pub lines: Vec<String>,
    /// Where the file position moves once the batch is acknowledged.
    end: u64,
}

impl FileTail {
    /// Follows `path` from its beginning.
    pub fn new(path: PathBuf) -> Self {
        Self { path, offset: 0 }
    }

    /// The file followed.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The complete lines after the acknowledged position (at most [`MAX_BATCH_BYTES`]), or
    /// `None` when there is no complete new line or no file yet. A file that shrank was
    /// truncated or replaced: it is followed again from its beginning.
    pub async fn read(&mut self) -> std::io::Result<Option<Batch>> {
        let mut file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata().await?.len();
        if len < self.offset {
            tracing::info!(path = %self.path.display(), "log file shrank; following it from its start");
            self.offset = 0;
        }
        if len == self.offset {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(self.offset)).await?;
        let want =
            usize::try_from(len - self.offset).map_or(MAX_BATCH_BYTES, |n| n.min(MAX_BATCH_BYTES));
        let mut buf = vec![0; want];
        file.read_exact(&mut buf).await?;
        let complete = match buf.iter().rposition(|&b| b == b'\n') {
            Some(last) => last + 1,
            // One line longer than a batch: ship it in pieces rather than never.
            None if want == MAX_BATCH_BYTES => want,
            None => return Ok(None),
        };
        let lines = String::from_utf8_lossy(&buf[..complete])
            .split_terminator('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
            .collect();
        Ok(Some(Batch {
            lines,
            end: self.offset + complete as u64,
        }))
    }

    /// The allocator has `batch`: move past it.
    pub fn acknowledge(&mut self, batch: &Batch) {
        self.offset = batch.end;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn lines_are_read_once_acknowledged_and_partial_lines_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut tail = FileTail::new(path.clone());
        assert_eq!(tail.read().await.unwrap(), None, "no file yet");
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "one\ntwo\r\nthr").unwrap();
        let batch = tail.read().await.unwrap().unwrap();
        assert_eq!(batch.lines, ["one", "two"]);
        // Not acknowledged: the same batch again.
        assert_eq!(tail.read().await.unwrap().unwrap(), batch);
        tail.acknowledge(&batch);
        assert_eq!(tail.read().await.unwrap(), None, "partial line");
        writeln!(f, "ee").unwrap();
        let batch = tail.read().await.unwrap().unwrap();
        assert_eq!(batch.lines, ["three"]);
        tail.acknowledge(&batch);
        // Truncated and rewritten: followed from the start.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(tail.read().await.unwrap().unwrap().lines, ["new"]);
    }

    #[tokio::test]
    async fn batches_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let line = "x".repeat(99);
        std::fs::write(&path, format!("{line}\n").repeat(2000)).unwrap();
        let mut tail = FileTail::new(path);
        let mut total = 0;
        while let Some(batch) = tail.read().await.unwrap() {
            assert!(batch.lines.len() * 100 <= MAX_BATCH_BYTES);
            assert!(batch.lines.iter().all(|l| *l == line));
            total += batch.lines.len();
            tail.acknowledge(&batch);
        }
        assert_eq!(total, 2000);
    }
}
