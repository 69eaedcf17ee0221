//! Small facts the agent keeps across its own restarts and VM reboots (`LABLINK_STATE_DIR`):
//! the assignment it already handled, and how far each log file was shipped.

use std::path::PathBuf;

/// A directory of one-line files, or nothing (facts are then kept in memory only).
#[derive(Debug, Clone, Default)]
pub struct StateDir(Option<PathBuf>);

impl StateDir {
    /// Facts live in `dir` (created when first written), or nowhere.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self(dir)
    }

    /// The fact `name`, if it was saved.
    pub fn load(&self, name: &str) -> Option<String> {
        let dir = self.0.as_ref()?;
        std::fs::read_to_string(dir.join(name)).ok()
    }

    /// Saves `value` as `name`, atomically (a crash leaves the old or the new value).
    pub fn save(&self, name: &str, value: &str) {
        let Some(dir) = &self.0 else {
            return;
        };
        let tmp = dir.join(format!(".{name}.tmp"));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, value))
            .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
        if let Err(e) = written {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot save agent state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_survive_a_new_instance_and_nothing_is_kept_without_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(Some(dir.path().join("agent")));
        assert_eq!(state.load("assignment"), None);
        state.save("assignment", "2026-01-01T00:00:00Z");
        let again = StateDir::new(Some(dir.path().join("agent")));
        assert_eq!(
            again.load("assignment").as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        let none = StateDir::new(None);
        none.save("assignment", "x");
        assert_eq!(none.load("assignment"), None);
    }
}
