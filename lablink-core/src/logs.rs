//! VM logs: streams, cleaning of incoming lines, and a byte-capped buffer that drops the
//! oldest lines first.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Which log of a VM lines belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// cloud-init / boot output.
    CloudInit,
    /// The research-software container's output.
    Container,
    /// The LabLink agent's own log.
    Agent,
}

impl LogStream {
    /// All streams, in display order.
    pub const ALL: [LogStream; 3] = [Self::CloudInit, Self::Container, Self::Agent];

    /// The stream a compatibility `log_group` (docs/protocol.md) goes to: a group ending in `-docker` is the
    /// container log, anything else cloud-init.
    pub fn from_log_group(group: &str) -> Self {
        if group.ends_with("-docker") {
            Self::Container
        } else {
            Self::CloudInit
        }
    }

    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CloudInit => "cloud_init",
            Self::Container => "container",
            Self::Agent => "agent",
        }
    }
}

/// Lines to append to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAppend {
    /// The stream.
    pub stream: LogStream,
    /// Cleaned lines (see [`clean_lines`]).
    pub lines: Vec<String>,
}

/// A VM's logs, one string per stream, lines joined by `\n`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmLogs {
    /// cloud-init / boot output.
    pub cloud_init: String,
    /// The container's output.
    pub container: String,
    /// The agent's own log.
    pub agent: String,
}

impl VmLogs {
    /// The text of one stream.
    pub fn stream(&self, stream: LogStream) -> &str {
        match stream {
            LogStream::CloudInit => &self.cloud_init,
            LogStream::Container => &self.container,
            LogStream::Agent => &self.agent,
        }
    }
}

/// Strips ANSI escape sequences and carriage returns, splits embedded newlines, and drops
/// blank lines.
pub fn clean_lines<'a>(messages: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    messages
        .into_iter()
        .flat_map(|m| m.split('\n'))
        .map(strip_ansi)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                // CSI: ESC [ params final-byte(0x40..=0x7e)
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: ESC ] ... BEL or ESC \
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {
                    chars.next();
                }
            },
            '\r' => {}
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// A log stream capped in bytes (each line counts its length plus one for the newline).
/// Appending beyond the cap drops the oldest lines; a single line longer than the cap keeps
/// only its last `cap` bytes. The cap always holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundedLog {
    lines: VecDeque<String>,
    bytes: usize,
}

impl BoundedLog {
    /// Appends the lines of `lines` that [`fit_lines`] keeps, then drops oldest lines until
    /// the total is at most `cap` bytes.
    pub fn append(&mut self, lines: &[String], cap: usize) {
        for line in fit_lines(lines, cap) {
            self.bytes += line.len() + 1;
            self.lines.push_back(line.to_owned());
        }
        while self.bytes > cap {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.len() + 1;
        }
    }

    /// Bytes held, counting one newline per line.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The lines joined by `\n`.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.bytes);
        for (i, l) in self.lines.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(l);
        }
        out
    }
}

/// The lines of one batch that survive a cap of `cap` bytes, oldest first: each line cut
/// to its last `cap - 1` bytes (on a character boundary), empty ones skipped, and only the
/// newest that fit together (each counts its length plus one for its newline). Every store
/// keeps logs by this rule.
pub fn fit_lines(lines: &[String], cap: usize) -> Vec<&str> {
    let max_line = cap.saturating_sub(1);
    let mut kept = Vec::new();
    let mut bytes = 0;
    for line in lines.iter().rev() {
        let line = tail_within(line, max_line);
        if line.is_empty() {
            continue;
        }
        if bytes + line.len() + 1 > cap {
            break;
        }
        bytes += line.len() + 1;
        kept.push(line);
    }
    kept.reverse();
    kept
}

/// The last at most `max` bytes of `s`, cut on a character boundary.
fn tail_within(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_strips_ansi_and_drops_blank_lines() {
        let lines = clean_lines([
            "\u{1b}[1;31mred\u{1b}[0m text\r",
            "",
            "   ",
            "a\nb\n\nc",
            "\u{1b}]0;title\u{7}after",
        ]);
        assert_eq!(lines, ["red text", "a", "b", "c", "after"]);
    }

    #[test]
    fn the_cap_holds_and_oldest_lines_go_first() {
        let mut log = BoundedLog::default();
        let lines: Vec<String> = (0..1000).map(|i| format!("line {i:04}")).collect();
        log.append(&lines, 100);
        assert!(log.bytes() <= 100);
        assert!(log.text().len() <= 100);
        assert!(log.text().ends_with("line 0999"));
        assert!(!log.text().contains("line 0000"));
        log.append(&["x".repeat(500)], 100);
        assert!(log.bytes() <= 100);
        assert_eq!(log.text(), "x".repeat(99));
    }

    #[test]
    fn a_batch_keeps_its_newest_lines_within_the_cap() {
        let batches: Vec<Vec<String>> = vec![
            (0..100).map(|i| format!("line {i:03}")).collect(),
            vec!["x".repeat(500), "short".into()],
            vec!["é".repeat(80)],
            vec![String::new(), "a".into()],
        ];
        for cap in [0, 1, 2, 10, 64, 100, 1000] {
            for lines in &batches {
                let fitted = fit_lines(lines, cap);
                assert!(fitted.iter().map(|l| l.len() + 1).sum::<usize>() <= cap);
                if let (Some(last), Some(newest)) = (fitted.last(), lines.last()) {
                    assert!(
                        newest.ends_with(last),
                        "cap {cap}: the newest line was not kept"
                    );
                }
            }
        }
        let lines: Vec<String> = (0..100).map(|i| format!("line {i:03}")).collect();
        assert_eq!(fit_lines(&lines, 20), ["line 098", "line 099"]);
        assert_eq!(fit_lines(&["é".repeat(3)], 4), ["é"]);
    }

    #[test]
    fn log_groups_map_to_streams() {
        assert_eq!(
            LogStream::from_log_group("lablink-docker"),
            LogStream::Container
        );
        assert_eq!(
            LogStream::from_log_group("lablink-cloud-init"),
            LogStream::CloudInit
        );
    }
}
