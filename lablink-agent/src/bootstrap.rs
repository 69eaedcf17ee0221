//! What the agent does once, before it registers as `running`: the VM's research software.
//! Every step is optional and set by the user data in the agent's environment:
//!
//! - `SUBJECT_IMAGE`: a container image, pulled (retried) and started as
//!   `docker run -d --name lablink-subject --restart unless-stopped [--gpus all]
//!   -v <home>:<home> <image>`. `--gpus all` when `GPU_SUPPORT=true` or `nvidia-smi` answered
//!   the agent's GPU check; the desktop user's home is mounted so that collections find the
//!   participant's work. An existing `lablink-subject` container is left alone.
//! - `TUTORIAL_REPO_TO_CLONE`: `git clone`d into the desktop user's home (skipped when the
//!   directory is already there), then owned by that user (when the agent runs as root).
//! - `LABLINK_STARTUP_SCRIPT`: the path of a script, or an inline script, run with `bash`;
//!   tried `LABLINK_STARTUP_RETRIES` times (default 3).
//! - `STARTUP_ON_ERROR`: what a step that failed every attempt does: `continue` (the
//!   default: it is logged and the VM becomes available) or `fail` (the agent reports status
//!   `error` with the reason in its log, and never becomes available).
//! - `LABLINK_BOOTSTRAP_TIMEOUT_SECS`: the time all the steps together may take (default 30
//!   minutes). A bootstrap still running then is stopped (its programs killed) and counts
//!   as a failed step, so a hung pull or script cannot keep a VM booting for ever.
//!
//! The desktop user is `LABLINK_CRD_USER` (also Chrome Remote Desktop's `--user-name`); its
//! home is `LABLINK_DESKTOP_HOME`, by default `/home/<user>`. `docker`, `git` and `bash` are
//! found on `PATH`; none of them sees the agent's `API_TOKEN`. With a state dir, a finished
//! bootstrap is remembered: a restarted agent does not run it again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::state::StateDir;

/// The container the subject image runs as.
pub const CONTAINER_NAME: &str = "lablink-subject";
/// The state fact recording a finished bootstrap.
const DONE: &str = "bootstrap";
/// Attempts at pulling the image and cloning the repository.
const FETCH_ATTEMPTS: u32 = 3;

/// What a step that failed does to the VM (`STARTUP_ON_ERROR`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnError {
    /// Log it and become available anyway.
    #[default]
    Continue,
    /// Report status `error` and never become available.
    Fail,
}

/// The bootstrap settings (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// `SUBJECT_IMAGE`.
    pub subject_image: Option<String>,
    /// `TUTORIAL_REPO_TO_CLONE`.
    pub tutorial_repo: Option<String>,
    /// `LABLINK_STARTUP_SCRIPT`: a file's path or an inline script.
    pub startup_script: Option<String>,
    /// `LABLINK_STARTUP_RETRIES`: attempts at the start-up script (at least 1).
    pub startup_attempts: u32,
    /// `STARTUP_ON_ERROR`.
    pub on_error: OnError,
    /// `GPU_SUPPORT=true`: the container gets the GPUs even without a working `nvidia-smi`.
    pub gpu_support: bool,
    /// `LABLINK_DESKTOP_HOME`: the desktop user's home (default `/home/<LABLINK_CRD_USER>`).
    pub desktop_home: Option<PathBuf>,
    /// `LABLINK_BOOTSTRAP_RETRY_SECS`: pause between attempts (default 5 s).
    pub retry_delay: Duration,
    /// `LABLINK_BOOTSTRAP_TIMEOUT_SECS`: the time all steps together may take (default 30 min).
    pub timeout: Duration,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            subject_image: None,
            tutorial_repo: None,
            startup_script: None,
            startup_attempts: 3,
            on_error: OnError::Continue,
            gpu_support: false,
            desktop_home: None,
            retry_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// A step failed every attempt; the message is one line and names the step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepFailed(pub String);

/// Runs the bootstrap steps in order. `gpu` says whether the agent's GPU check found
/// `nvidia-smi`; `user` is the desktop user; `note` receives one line per event. An error is
/// a step that failed with `STARTUP_ON_ERROR=fail`: the VM must not become available.
pub async fn run(
    config: &BootstrapConfig,
    user: Option<&str>,
    gpu: bool,
    state: &StateDir,
    note: impl Fn(String),
) -> Result<(), StepFailed> {
    if state.load(DONE).is_some() {
        note("bootstrap already done on this machine; skipped".into());
        return Ok(());
    }
    let home = home_of(config, user);
    let all_steps = async {
        let mut steps: Vec<Result<(), StepFailed>> = Vec::new();
        if let Some(repo) = &config.tutorial_repo {
            steps.push(clone(config, repo, home.as_deref(), user, &note).await);
        }
        if let Some(image) = &config.subject_image {
            let gpus = config.gpu_support || gpu;
            steps.push(container(config, image, home.as_deref(), gpus, &note).await);
        }
        if let Some(script) = &config.startup_script {
            steps.push(startup_script(config, script, &note).await);
        }
        steps
    };
    // Dropping the unfinished steps kills the programs they run, with their children.
    let steps = tokio::time::timeout(config.timeout, all_steps)
        .await
        .unwrap_or_else(|_| {
            vec![Err(StepFailed(format!(
                "the set-up did not finish within {} s (LABLINK_BOOTSTRAP_TIMEOUT_SECS); stopped",
                config.timeout.as_secs_f64()
            )))]
        });
    let mut all_done = true;
    for failed in steps.iter().filter_map(|s| s.as_ref().err()) {
        all_done = false;
        match config.on_error {
            OnError::Continue => note(format!("{failed}; continuing (STARTUP_ON_ERROR=continue)")),
            OnError::Fail => return Err(failed.clone()),
        }
    }
    // Only a whole bootstrap is remembered: after a restart a failed step is tried again
    // (the finished ones skip themselves: the clone is there, the container exists).
    if all_done {
        state.save(DONE, "done");
    }
    Ok(())
}

/// Runs `program args` with the agent's environment minus its token; whether it exited 0.
/// The program runs in its own process group, killed whole if this future is dropped
/// before it exits (the bootstrap's time limit), so a script's own children go too.
async fn succeeds(program: &str, args: &[&str], note: &impl Fn(String)) -> bool {
    let spawned = Command::new(program)
        .args(args)
        .env_remove("API_TOKEN")
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            note(format!("cannot run {program}: {e}"));
            return false;
        }
    };
    let mut group = KillGroupOnDrop(child.id());
    let status = child.wait().await;
    // Exited: what it left running on purpose (a service it started) is not ours to kill.
    group.0 = None;
    match status {
        Ok(status) => status.success(),
        Err(e) => {
            note(format!("cannot wait for {program}: {e}"));
            false
        }
    }
}

/// The process group of a running step, killed when dropped unless cleared.
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0.and_then(|id| i32::try_from(id).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs `program args` up to `attempts` times; whether one attempt succeeded.
async fn with_retries(
    what: &str,
    attempts: u32,
    delay: Duration,
    program: &str,
    args: &[&str],
    note: &impl Fn(String),
) -> bool {
    for attempt in 1..=attempts.max(1) {
        if succeeds(program, args, note).await {
            return true;
        }
        note(format!("{what} failed (attempt {attempt} of {attempts})"));
        if attempt < attempts {
            tokio::time::sleep(delay).await;
        }
    }
    false
}

/// Puts back what the set-up put into the desktop user's home (the tutorial), after a reset
/// restored the home from its skeleton: the next participant starts from the same home as
/// the first one did.
pub async fn refill_home(
    config: &BootstrapConfig,
    user: Option<&str>,
    note: impl Fn(String),
) -> Result<(), StepFailed> {
    let Some(repo) = &config.tutorial_repo else {
        return Ok(());
    };
    clone(config, repo, home_of(config, user).as_deref(), user, &note).await
}

/// The desktop user's home: `LABLINK_DESKTOP_HOME`, else `/home/<user>`.
fn home_of(config: &BootstrapConfig, user: Option<&str>) -> Option<PathBuf> {
    config
        .desktop_home
        .clone()
        .or_else(|| user.map(|u| Path::new("/home").join(u)))
}

async fn clone(
    config: &BootstrapConfig,
    repo: &str,
    home: Option<&Path>,
    user: Option<&str>,
    note: &impl Fn(String),
) -> Result<(), StepFailed> {
    let Some(home) = home else {
        return Err(StepFailed(
            "the tutorial repository was not cloned: no desktop user (LABLINK_CRD_USER)".into(),
        ));
    };
    let name = repo
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or_default()
        .trim_end_matches(".git");
    if name.is_empty() || name == "." || name == ".." {
        return Err(StepFailed(format!(
            "the tutorial repository {} has no directory name",
            shown(repo)
        )));
    }
    let target = home.join(name);
    if target.exists() {
        note(format!(
            "tutorial already at {}; not cloned again",
            target.display()
        ));
        return Ok(());
    }
    let target_arg = target.to_string_lossy().into_owned();
    let cloned = with_retries(
        "git clone of the tutorial",
        FETCH_ATTEMPTS,
        config.retry_delay,
        "git",
        &["clone", "--", repo, &target_arg],
        note,
    )
    .await;
    if !cloned {
        return Err(StepFailed(format!(
            "the tutorial repository {} could not be cloned",
            shown(repo)
        )));
    }
    // `/proc/self` belongs to the process's effective user.
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if let (true, Some(user)) = (root, user) {
        let owner = format!("{user}:");
        if !succeeds("chown", &["-R", "--", &owner, &target_arg], note).await {
            note(format!("the tutorial could not be given to {user}"));
        }
    }
    note(format!("tutorial cloned into {}", target.display()));
    Ok(())
}

async fn container(
    config: &BootstrapConfig,
    image: &str,
    home: Option<&Path>,
    gpus: bool,
    note: &impl Fn(String),
) -> Result<(), StepFailed> {
    let exists = Command::new("docker")
        .args(["container", "inspect", CONTAINER_NAME])
        .env_remove("API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .is_ok_and(|s| s.success());
    if exists {
        note(format!(
            "container {CONTAINER_NAME} already exists; left as it is"
        ));
        return Ok(());
    }
    let pulled = with_retries(
        &format!("docker pull {image}"),
        FETCH_ATTEMPTS,
        config.retry_delay,
        "docker",
        &["pull", image],
        note,
    )
    .await;
    if !pulled {
        return Err(StepFailed(format!("the image {image} could not be pulled")));
    }
    let mut args = vec![
        "run".to_owned(),
        "-d".into(),
        "--name".into(),
        CONTAINER_NAME.into(),
        "--restart".into(),
        "unless-stopped".into(),
    ];
    if gpus {
        args.extend(["--gpus".into(), "all".into()]);
    }
    if let Some(home) = home {
        let home = home.to_string_lossy();
        args.extend(["-v".into(), format!("{home}:{home}")]);
    }
    args.push(image.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if !succeeds("docker", &args, note).await {
        return Err(StepFailed(format!(
            "the container of {image} did not start"
        )));
    }
    note(format!(
        "container {CONTAINER_NAME} started from {image} (GPUs: {gpus})"
    ));
    Ok(())
}

async fn startup_script(
    config: &BootstrapConfig,
    script: &str,
    note: &impl Fn(String),
) -> Result<(), StepFailed> {
    let is_file = !script.contains('\n') && Path::new(script.trim()).is_file();
    let args: Vec<&str> = if is_file {
        vec![script.trim()]
    } else {
        vec!["-c", script]
    };
    let attempts = config.startup_attempts.max(1);
    let ran = with_retries(
        "the start-up script",
        attempts,
        config.retry_delay,
        "bash",
        &args,
        note,
    )
    .await;
    if !ran {
        return Err(StepFailed(format!(
            "the start-up script failed (attempts: {attempts})"
        )));
    }
    note("the start-up script succeeded".into());
    Ok(())
}

/// A repository URL as it may be logged: without credentials (`https://user:token@host`)
/// or a query.
fn shown(repo: &str) -> String {
    let without_query = repo.split(['?', '#']).next().unwrap_or_default();
    match without_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}/{path}")
        }
        None => without_query.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_repository_is_logged_without_its_credentials() {
        assert_eq!(
            super::shown("https://ada:ghp_secret@github.com/lab/tutorial.git?x=1"),
            "https://github.com/lab/tutorial.git"
        );
        assert_eq!(
            super::shown("git@github.com:lab/t.git"),
            "git@github.com:lab/t.git"
        );
    }
}
