//! Resetting the machine for the next participant (`[allocator] reuse = "reset"`: the
//! allocator asks with `reset` in the task poll once a participant's assignment ended and
//! their work was collected).
//!
//! The steps, in order:
//!
//! 1. Stop the Chrome Remote Desktop host, when its package is installed
//!    (`/opt/google/chrome-remote-desktop/chrome-remote-desktop --stop`, as the desktop user
//!    when the agent runs as root). Best effort: the next steps end it anyway.
//! 2. End the desktop user's session: `LABLINK_RESET_END_SESSION` (a command split on
//!    whitespace, run without a shell), by default `pkill -KILL -u <LABLINK_CRD_USER>` when
//!    the agent runs as root. pkill's exit status 1 (no process matched) is success.
//! 3. Restore the home directory (`LABLINK_RESET_HOME`; default the desktop user's home:
//!    `LABLINK_DESKTOP_HOME`, else `/home/<LABLINK_CRD_USER>`)
//!    from a skeleton (`LABLINK_RESET_SKELETON`, default `/etc/skel`): everything inside the
//!    home is deleted (the home itself stays; symbolic links are removed, never followed),
//!    then the skeleton is copied in (its symbolic links as links) and, when the agent runs
//!    as root, given to the desktop user (else to the home's owner). The remote-desktop host
//!    registration lives in the home (`~/.config/chrome-remote-desktop`), so it goes too.
//!
//! Without a desktop user or a configured home there is nothing to reset: that is an error
//! ([`ResetError::NotConfigured`]), so that a VM is never handed out again as if it were clean.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Where Google's Chrome Remote Desktop package installs its host script.
pub const CRD_HOST_SCRIPT: &str = "/opt/google/chrome-remote-desktop/chrome-remote-desktop";
/// The skeleton of a new home on Debian and Ubuntu.
pub const DEFAULT_SKELETON: &str = "/etc/skel";
/// Longest one command of the reset may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of the reset (`LABLINK_RESET_HOME`, `LABLINK_RESET_SKELETON`,
/// `LABLINK_RESET_END_SESSION`); the desktop user is `LABLINK_CRD_USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetConfig {
    /// The home directory to restore; `None`: the desktop user's home (`LABLINK_DESKTOP_HOME`,
    /// else `/home/<desktop user>`).
    pub home: Option<PathBuf>,
    /// What the home is restored from.
    pub skeleton: PathBuf,
    /// What ends the desktop user's session; `None`: `pkill -KILL -u <desktop user>` when
    /// the agent runs as root (else nothing).
    pub end_session: Option<Vec<String>>,
    /// Chrome Remote Desktop's host script, stopped with `--stop` when it exists.
    pub crd_host: PathBuf,
}

impl Default for ResetConfig {
    fn default() -> Self {
        Self {
            home: None,
            skeleton: DEFAULT_SKELETON.into(),
            end_session: None,
            crd_host: CRD_HOST_SCRIPT.into(),
        }
    }
}

/// Why a reset failed; each message says which step.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// Neither a desktop user nor a home directory is configured.
    #[error("reset is not configured: set LABLINK_CRD_USER or LABLINK_RESET_HOME")]
    NotConfigured,
    /// The command that ends the desktop session failed.
    #[error("ending the desktop session failed: `{command}` {why}")]
    EndSession {
        /// The command, as configured.
        command: String,
        /// How it failed.
        why: String,
    },
    /// The home directory could not be restored.
    #[error("restoring the home directory {} from {} failed: {why}", home.display(), skeleton.display())]
    Home {
        /// The home directory.
        home: PathBuf,
        /// The skeleton.
        skeleton: PathBuf,
        /// What failed.
        why: String,
    },
    /// The set-up's content of the home (the tutorial) could not be put back.
    #[error("{0}")]
    Refill(#[from] crate::bootstrap::StepFailed),
}

/// What one reset does, resolved from [`ResetConfig`] and the desktop user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPlan {
    /// The home directory to restore.
    pub home: PathBuf,
    /// Its skeleton.
    pub skeleton: PathBuf,
    /// The command that ends the session, if any.
    pub end_session: Option<Vec<String>>,
    /// The desktop user, if known.
    pub user: Option<String>,
    /// Chrome Remote Desktop's host script.
    pub crd_host: PathBuf,
}

impl ResetConfig {
    /// The reset for desktop user `user`, whose home is `desktop_home` when configured
    /// (`LABLINK_DESKTOP_HOME`); [`ResetError::NotConfigured`] when there is neither a user
    /// nor a home.
    pub fn plan(
        &self,
        user: Option<&str>,
        desktop_home: Option<&Path>,
    ) -> Result<ResetPlan, ResetError> {
        let home = match (&self.home, user) {
            (Some(home), _) => home.clone(),
            (None, Some(user)) => desktop_home
                .map(Path::to_owned)
                .unwrap_or_else(|| Path::new("/home").join(user)),
            (None, None) => return Err(ResetError::NotConfigured),
        };
        let end_session = match (&self.end_session, user) {
            (Some(command), _) => Some(command.clone()).filter(|c| !c.is_empty()),
            (None, Some(user)) if running_as_root() => {
                Some(["pkill", "-KILL", "-u", user].map(str::to_owned).to_vec())
            }
            (None, _) => None,
        };
        Ok(ResetPlan {
            home,
            skeleton: self.skeleton.clone(),
            end_session,
            user: user.map(str::to_owned),
            crd_host: self.crd_host.clone(),
        })
    }
}

impl ResetPlan {
    /// Runs the reset's steps; `note` receives one line per step.
    pub async fn run(&self, note: impl Fn(String)) -> Result<(), ResetError> {
        self.stop_crd_host(&note).await;
        match &self.end_session {
            Some(command) => {
                end_session(command).await?;
                note(format!("desktop session ended (`{}`)", command.join(" ")));
            }
            None => note(
                "no command ends the desktop session (the agent is not root, or there is no \
                 desktop user; LABLINK_RESET_END_SESSION sets one); skipped"
                    .into(),
            ),
        }
        let (home, skeleton) = (self.home.clone(), self.skeleton.clone());
        let owner = if running_as_root() {
            self.user
                .as_deref()
                .and_then(ids_of)
                .or_else(|| owner_of(&home))
        } else {
            None
        };
        let restored = tokio::task::spawn_blocking(move || restore_home(&home, &skeleton, owner))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match restored {
            Ok(copied) => {
                note(format!(
                    "home {} restored from {} ({copied} entries)",
                    self.home.display(),
                    self.skeleton.display()
                ));
                Ok(())
            }
            Err(why) => Err(ResetError::Home {
                home: self.home.clone(),
                skeleton: self.skeleton.clone(),
                why,
            }),
        }
    }

    /// Stops the Chrome Remote Desktop host, if its package is installed (best effort).
    async fn stop_crd_host(&self, note: &impl Fn(String)) {
        if !self.crd_host.is_file() {
            return;
        }
        let mut command = match self.user.as_deref().filter(|_| running_as_root()) {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&self.crd_host);
                c
            }
            None => Command::new(&self.crd_host),
        };
        command.arg("--stop");
        let line = match run(command).await {
            Ok(_) => "Chrome Remote Desktop host stopped".to_owned(),
            Err(why) => format!(
                "stopping the Chrome Remote Desktop host failed ({why}); going on (its \
                 registration goes with the home)"
            ),
        };
        note(line);
    }
}

/// Runs `command` (no shell) and waits for it: `Ok` on success, or for `pkill`'s exit
/// status 1 (nothing matched: nothing to end).
async fn end_session(command: &[String]) -> Result<(), ResetError> {
    let shown = command.join(" ");
    let failed = |why| ResetError::EndSession {
        command: shown.clone(),
        why,
    };
    let (program, args) = command
        .split_first()
        .ok_or_else(|| failed("is empty".into()))?;
    let mut c = Command::new(program);
    c.args(args);
    match run(c).await {
        Ok(()) => Ok(()),
        Err(Failure::Exited(1, _)) if is_pkill(program) => Ok(()),
        Err(why) => Err(failed(why.to_string())),
    }
}

fn is_pkill(program: &str) -> bool {
    Path::new(program).file_name().is_some_and(|n| n == "pkill")
}

/// How a command of the reset failed.
#[derive(Debug)]
enum Failure {
    /// It could not be started.
    Start(std::io::Error),
    /// It did not finish in [`COMMAND_TIMEOUT`].
    TimedOut,
    /// It exited with this status, saying this (its stderr, on one line).
    Exited(i32, String),
    /// A signal ended it.
    Killed,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start(e) => write!(f, "could not be started: {e}"),
            Self::TimedOut => write!(f, "did not finish in {COMMAND_TIMEOUT:?}"),
            Self::Exited(code, said) if said.is_empty() => write!(f, "exited with status {code}"),
            Self::Exited(code, said) => write!(f, "exited with status {code}: {said}"),
            Self::Killed => f.write_str("was killed by a signal"),
        }
    }
}

async fn run(mut command: Command) -> Result<(), Failure> {
    let output = command
        .env_remove("API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, output).await {
        Err(_) => return Err(Failure::TimedOut),
        Ok(Err(e)) => return Err(Failure::Start(e)),
        Ok(Ok(output)) => output,
    };
    match output.status.code() {
        Some(0) => Ok(()),
        Some(code) => {
            let said = String::from_utf8_lossy(&output.stderr);
            let said: String = said.split_whitespace().collect::<Vec<_>>().join(" ");
            Err(Failure::Exited(code, said.chars().take(300).collect()))
        }
        None => Err(Failure::Killed),
    }
}

/// Empties `home` (not `home` itself; symbolic links are removed, never followed) and copies
/// `skeleton` into it, its symbolic links as links, each entry (and `home`) given to `owner`
/// (uid, gid) when set. The number of entries copied.
pub fn restore_home(
    home: &Path,
    skeleton: &Path,
    owner: Option<(u32, u32)>,
) -> std::io::Result<usize> {
    use std::io::{Error, ErrorKind};
    let at = |path: &Path| {
        let path = path.to_owned();
        move |e: Error| Error::new(e.kind(), format!("{}: {e}", path.display()))
    };
    if !home.is_absolute() || home.parent().is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a home directory", home.display()),
        ));
    }
    let meta = std::fs::symlink_metadata(home).map_err(at(home))?;
    if !meta.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a directory", home.display()),
        ));
    }
    if !std::fs::metadata(skeleton).map_err(at(skeleton))?.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a directory", skeleton.display()),
        ));
    }
    for entry in std::fs::read_dir(home).map_err(at(home))? {
        let path = entry.map_err(at(home))?.path();
        // `remove_dir_all` removes symbolic links inside the tree; it never follows them.
        let is_dir = std::fs::symlink_metadata(&path)
            .map_err(at(&path))?
            .is_dir();
        if is_dir {
            std::fs::remove_dir_all(&path).map_err(at(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(at(&path))?;
        }
    }
    let give = |path: &Path| match owner {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(at(path)),
        None => Ok(()),
    };
    let mut copied = 0;
    for entry in walkdir::WalkDir::new(skeleton)
        .follow_links(false)
        .min_depth(1)
    {
        let entry = entry.map_err(|e| Error::other(e.to_string()))?;
        let relative = entry
            .path()
            .strip_prefix(skeleton)
            .map_err(|e| Error::other(e.to_string()))?;
        let target = home.join(relative);
        let kind = entry.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&target).map_err(at(&target))?;
            let mode = entry.metadata().map_err(|e| Error::other(e.to_string()))?;
            std::fs::set_permissions(&target, mode.permissions()).map_err(at(&target))?;
        } else if kind.is_symlink() {
            let points_to = std::fs::read_link(entry.path()).map_err(at(entry.path()))?;
            std::os::unix::fs::symlink(points_to, &target).map_err(at(&target))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).map_err(at(&target))?;
        } else {
            // Sockets, fifos, devices: not what a skeleton holds.
            continue;
        }
        give(&target)?;
        copied += 1;
    }
    give(home)?;
    Ok(copied)
}

/// Whether this process runs as root (`/proc/self` belongs to its effective user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The uid and gid of `user`, from `/etc/passwd`.
fn ids_of(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// The uid and gid owning `path`.
fn owner_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.uid(), m.gid()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every entry under `dir` (not following links): relative path → what it is.
    fn tree(dir: &Path) -> BTreeMap<String, String> {
        walkdir::WalkDir::new(dir)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let what = if e.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(e.path()).unwrap().display())
                } else if e.file_type().is_dir() {
                    "dir".to_owned()
                } else {
                    std::fs::read_to_string(e.path()).unwrap()
                };
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                (rel, what)
            })
            .collect()
    }

    /// A used home (files, hidden files, a nested dir, links out of it), a skeleton, and
    /// a directory outside both that the home's links point at.
    fn used_home() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (home, skel, outside) = (
            dir.path().join("home"),
            dir.path().join("skel"),
            dir.path().join("outside"),
        );
        for d in [&home, &skel, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(outside.join("keep.txt"), "not the participant's").unwrap();
        std::fs::write(home.join("labels.slp"), "work").unwrap();
        std::fs::write(home.join(".bash_history"), "secret commands").unwrap();
        std::fs::create_dir_all(home.join(".config/chrome-remote-desktop")).unwrap();
        std::fs::write(
            home.join(".config/chrome-remote-desktop/host#1.json"),
            "{\"host_id\": \"x\"}",
        )
        .unwrap();
        std::fs::create_dir_all(home.join("a/b/c")).unwrap();
        std::fs::write(home.join("a/b/c/deep.txt"), "deep").unwrap();
        std::os::unix::fs::symlink(&outside, home.join("outside-dir")).unwrap();
        std::os::unix::fs::symlink(&outside, home.join("a/b/link-in-tree")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep.txt"), home.join(".profile")).unwrap();
        std::fs::write(skel.join(".bashrc"), "# skeleton bashrc\n").unwrap();
        std::fs::create_dir(skel.join(".config")).unwrap();
        std::fs::write(skel.join(".config/user-dirs.conf"), "enabled=False\n").unwrap();
        std::os::unix::fs::symlink(".bashrc", skel.join(".bash_aliases")).unwrap();
        (dir, home, skel, outside)
    }

    #[test]
    fn the_home_holds_exactly_the_skeleton_and_links_out_of_it_are_not_followed() {
        let (_dir, home, skel, outside) = used_home();
        let copied = restore_home(&home, &skel, None).unwrap();
        assert_eq!(copied, 4);
        assert_eq!(tree(&home), tree(&skel));
        assert!(home.is_dir(), "the home itself stays");
        assert_eq!(
            tree(&outside),
            BTreeMap::from([("keep.txt".to_owned(), "not the participant's".to_owned())]),
            "what the links pointed at is untouched"
        );
        // Again, on a clean home: the same.
        restore_home(&home, &skel, None).unwrap();
        assert_eq!(tree(&home), tree(&skel));
    }

    #[test]
    fn a_home_that_is_missing_or_a_link_is_refused_and_nothing_is_deleted() {
        let (dir, home, skel, outside) = used_home();
        let link = dir.path().join("home-link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(restore_home(&link, &skel, None).is_err());
        assert!(outside.join("keep.txt").exists());
        assert!(restore_home(&dir.path().join("nobody"), &skel, None).is_err());
        let e = restore_home(&home, &dir.path().join("no-skel"), None).unwrap_err();
        assert!(e.to_string().contains("no-skel"), "{e}");
        assert!(home.join("labels.slp").exists(), "nothing deleted");
        assert!(restore_home(Path::new("/"), &skel, None).is_err());
        assert!(restore_home(Path::new("relative"), &skel, None).is_err());
    }

    #[test]
    fn without_a_user_or_a_home_there_is_no_reset() {
        let config = ResetConfig::default();
        assert!(matches!(
            config.plan(None, Some(Path::new("/srv/x"))),
            Err(ResetError::NotConfigured)
        ));
        assert_eq!(
            ResetError::NotConfigured.to_string(),
            "reset is not configured: set LABLINK_CRD_USER or LABLINK_RESET_HOME"
        );
        let in_srv = config
            .plan(Some("participant"), Some(Path::new("/srv/participant")))
            .unwrap();
        assert_eq!(in_srv.home, Path::new("/srv/participant"));
        let plan = config.plan(Some("participant"), None).unwrap();
        assert_eq!(plan.home, Path::new("/home/participant"));
        assert_eq!(plan.skeleton, Path::new("/etc/skel"));
        if running_as_root() {
            assert_eq!(
                plan.end_session.unwrap(),
                ["pkill", "-KILL", "-u", "participant"]
            );
        } else {
            assert_eq!(plan.end_session, None, "never pkill the agent's own user");
        }
    }

    #[tokio::test]
    async fn a_reset_runs_every_step_and_a_failing_step_says_which() {
        let (_dir, home, skel, _outside) = used_home();
        let config = ResetConfig {
            home: Some(home.clone()),
            skeleton: skel.clone(),
            end_session: Some(vec!["true".into()]),
            crd_host: "/nonexistent/chrome-remote-desktop".into(),
        };
        let lines = std::sync::Mutex::new(Vec::new());
        let note = |line: String| lines.lock().unwrap().push(line);
        config.plan(None, None).unwrap().run(note).await.unwrap();
        assert_eq!(tree(&home), tree(&skel));
        let lines = lines.into_inner().unwrap();
        assert!(
            lines[0].contains("desktop session ended (`true`)"),
            "{lines:?}"
        );
        assert!(lines[1].contains("restored"), "{lines:?}");

        std::fs::write(home.join("work.slp"), "more work").unwrap();
        let failing = ResetConfig {
            end_session: Some(vec![
                "sh".into(),
                "-c".into(),
                "echo busy >&2; exit 2".into(),
            ]),
            ..config
        };
        let e = failing
            .plan(None, None)
            .unwrap()
            .run(|_| {})
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ending the desktop session failed: `sh -c echo busy >&2; exit 2` exited with status 2: busy"
        );
        assert!(home.join("work.slp").exists(), "the home is left as it was");
    }

    #[tokio::test]
    async fn pkill_finding_nothing_to_end_is_success() {
        assert!(is_pkill("/usr/bin/pkill") && is_pkill("pkill") && !is_pkill("pkill2"));
        // An exit status 1 of another program is a failure.
        let e = end_session(&["false".into()]).await.unwrap_err();
        assert!(e.to_string().contains("status 1"), "{e}");
    }
}
