//! Log shipping: follow a file and deliver its lines in batches. The file itself is the
//! buffer: the read position advances only after the allocator acknowledged a batch, so a
//! failed post sends the same batch again and memory stays bounded by one batch. The position
//! is `(inode, offset)`: a file replaced by rotation is followed from its start, and a saved
//! position lets a restarted agent go on where it stopped.

use std::io::SeekFrom;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Most bytes read for one batch.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// A file being followed.
#[derive(Debug)]
pub struct FileTail {
    path: PathBuf,
    position: Position,
}

/// How far a file was shipped: its inode and the offset after the last acknowledged line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The file's inode (0 before the file was first seen).
    pub inode: u64,
    /// Bytes shipped.
    pub offset: u64,
}

impl Position {
    /// `inode:offset`, for a state file.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.inode, self.offset)
    }

    /// Reads [`encode`](Self::encode)'s output.
    pub fn decode(text: &str) -> Option<Self> {
        let (inode, offset) = text.trim().split_once(':')?;
        Some(Self {
            inode: inode.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

/// Complete lines read from a [`FileTail`], not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The lines, without their `\n`.
    pub lines: Vec<String>,
    /// Where the file position moves once the batch is acknowledged.
    end: Position,
}

impl FileTail {
    /// Follows `path` from `position` (the default is its beginning).
    pub fn new(path: PathBuf, position: Position) -> Self {
        Self { path, position }
    }

    /// How far the file was shipped.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The file followed.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The complete lines after the acknowledged position (at most [`MAX_BATCH_BYTES`]), or
    /// `None` when there is no complete new line or no file yet. A file that shrank or has
    /// another inode was truncated or replaced: it is followed again from its beginning.
    pub async fn read(&mut self) -> std::io::Result<Option<Batch>> {
        let mut file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata().await?;
        let len = meta.len();
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        if inode != self.position.inode || len < self.position.offset {
            if self.position.offset > 0 {
                tracing::info!(path = %self.path.display(), "log file replaced or truncated; following it from its start");
            }
            self.position = Position { inode, offset: 0 };
        }
        let offset = self.position.offset;
        if len == offset {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(offset)).await?;
        let want =
            usize::try_from(len - offset).map_or(MAX_BATCH_BYTES, |n| n.min(MAX_BATCH_BYTES));
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
            end: Position {
                inode,
                offset: offset + complete as u64,
            },
        }))
    }

    /// The allocator has `batch`: move past it.
    pub fn acknowledge(&mut self, batch: &Batch) {
        self.position = batch.end;
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
        let mut tail = FileTail::new(path.clone(), Position::default());
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
        // A restarted agent resumes at the saved position.
        let saved = Position::decode(&tail.position().encode()).unwrap();
        writeln!(f, "four").unwrap();
        let mut resumed = FileTail::new(path.clone(), saved);
        assert_eq!(resumed.read().await.unwrap().unwrap().lines, ["four"]);
        // Truncated and rewritten: followed from the start.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(tail.read().await.unwrap().unwrap().lines, ["new"]);
        // Rotated: a new file (a new inode) longer than the old position.
        std::fs::rename(&path, dir.path().join("log.1")).unwrap();
        std::fs::write(&path, "rotated one\nrotated two\nrotated three\n").unwrap();
        assert_eq!(
            resumed.read().await.unwrap().unwrap().lines,
            ["rotated one", "rotated two", "rotated three"]
        );
    }

    #[tokio::test]
    async fn batches_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let line = "x".repeat(99);
        std::fs::write(&path, format!("{line}\n").repeat(2000)).unwrap();
        let mut tail = FileTail::new(path, Position::default());
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
