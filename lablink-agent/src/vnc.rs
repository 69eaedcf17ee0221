//! The VM's VNC server for the browser desktop (`LABLINK_DESKTOP=browser`): bound to
//! 127.0.0.1 only (the allocator reaches it through the agent's [tunnel](crate::tunnel)),
//! with a fresh password for every assignment.
//!
//! The password is the first 8 characters of the assignment's PIN (VNC passwords are at most
//! 8 bytes), written as a VNC password file: the password, zero-padded to 8 bytes,
//! DES-encrypted with VNC's fixed key, as `vncpasswd -f` writes it. TigerVNC's `Xvnc` reads
//! its `-rfbauth` file at every authentication, so a new password applies to the next
//! connection without a restart. When the agent runs as root, the VNC server runs as the
//! desktop user (`LABLINK_CRD_USER`, through `runuser`), who owns the file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use des::cipher::{BlockEncrypt, KeyInit};
use des::Des;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// VNC's fixed key for password files, as VNC's DES (d3des) takes it: each byte's bits in
/// the reverse of standard DES's order.
const PASSWORD_FILE_KEY: [u8; 8] = [23, 82, 107, 6, 35, 78, 88, 7];

/// How long a VNC server the agent started may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the VNC server (`VNC_PORT`, `VNC_COMMAND`, `LABLINK_VNC_PASSWORD_FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VncConfig {
    /// The port on 127.0.0.1 (`VNC_PORT`, default 5901: display `:1`).
    pub port: u16,
    /// The program and arguments that start the VNC server (`VNC_COMMAND`, split on
    /// whitespace, no shell). `None`: the agent starts `Xvnc` itself if it is on `PATH`,
    /// else expects one already listening on [`port`](Self::port).
    pub command: Option<Vec<String>>,
    /// The password file (`LABLINK_VNC_PASSWORD_FILE`; default `vnc-passwd` in the agent's
    /// state directory, else in the system's temporary directory).
    pub password_file: Option<PathBuf>,
    /// The desktop's size for an `Xvnc` the agent starts.
    pub geometry: String,
}

impl Default for VncConfig {
    fn default() -> Self {
        Self {
            port: 5901,
            command: None,
            password_file: None,
            geometry: "1280x800".into(),
        }
    }
}

impl VncConfig {
    /// The X display of [`port`](Self::port) (5900 + n), for an `Xvnc` the agent starts.
    pub fn display(&self) -> Option<u16> {
        self.port.checked_sub(5900)
    }

    /// The password file, under `state_dir` unless configured.
    pub fn password_path(&self, state_dir: Option<&Path>) -> PathBuf {
        match (&self.password_file, state_dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("vnc-passwd"),
            (None, None) => std::env::temp_dir().join(format!("lablink-vnc-{}.passwd", self.port)),
        }
    }
}

/// Why the VNC server is not available. Never holds the password.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    /// The password file could not be written.
    #[error("cannot write the VNC password file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VNC server could not be started.
    #[error("cannot start the VNC server {program}: {source}")]
    Start {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing listens on the port (and nothing could be started).
    #[error("no VNC server listens on 127.0.0.1:{0}{1}")]
    NotListening(u16, &'static str),
}

/// The VNC password of an assignment: the first 8 characters of its PIN.
pub fn password_of_pin(pin: &str) -> String {
    pin.chars().take(8).collect()
}

/// `key` with each byte's bits reversed: VNC's DES key order to standard DES's.
fn reversed(key: [u8; 8]) -> [u8; 8] {
    key.map(u8::reverse_bits)
}

fn des_encrypt(key: [u8; 8], block: &mut [u8; 8]) {
    let cipher = Des::new(&key.into());
    cipher.encrypt_block(block.into());
}

/// The 8 bytes of a VNC password file for `password` (longer passwords are cut at 8 bytes,
/// as every VNC server does).
pub fn password_file_bytes(password: &str) -> [u8; 8] {
    let mut block = [0u8; 8];
    for (b, p) in block.iter_mut().zip(password.bytes()) {
        *b = p;
    }
    des_encrypt(reversed(PASSWORD_FILE_KEY), &mut block);
    block
}

/// A VNC client's answer to the server's 16-byte `challenge` (VNC authentication,
/// RFC 6143 7.2.2): the challenge DES-encrypted with the password as the key, in VNC's bit
/// order. For clients in tests and benchmarks.
pub fn challenge_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password.bytes()) {
        *k = p;
    }
    let key = reversed(key);
    let mut out = *challenge;
    for half in out.chunks_exact_mut(8) {
        let block: &mut [u8; 8] = half.try_into().expect("8 bytes");
        des_encrypt(key, block);
    }
    out
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

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Writes the password file for `password` at `path` (mode 0600, replaced atomically so a
/// VNC server never reads half a file), owned by `user` when the agent runs as root.
pub fn write_password_file(
    path: &Path,
    password: &str,
    user: Option<&str>,
) -> Result<(), VncError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| VncError::PasswordFile {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(&password_file_bytes(password))
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    drop(file);
    if let (Some(user), true) = (user, running_as_root()) {
        let (uid, gid) = ids_of(user).ok_or_else(|| {
            error(std::io::Error::other(format!(
                "no user {user:?} in /etc/passwd"
            )))
        })?;
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(error)?;
    }
    std::fs::rename(&tmp, path).map_err(error)
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub async fn listening(port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .is_ok_and(|c| c.is_ok())
}

/// `name` on `PATH`, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The command that starts the VNC server: `VNC_COMMAND`, else `Xvnc` on display
/// `port - 5900` bound to 127.0.0.1 with VNC authentication from `password_file`; `None`
/// when neither is there.
pub fn start_command(config: &VncConfig, password_file: &Path) -> Option<Vec<String>> {
    if let Some(command) = &config.command {
        return Some(command.clone());
    }
    let xvnc = on_path("Xvnc")?;
    let display = config.display()?;
    Some(vec![
        xvnc.display().to_string(),
        format!(":{display}"),
        "-localhost".into(),
        "-rfbport".into(),
        config.port.to_string(),
        "-rfbauth".into(),
        password_file.display().to_string(),
        "-SecurityTypes".into(),
        "VncAuth".into(),
        "-geometry".into(),
        config.geometry.clone(),
        "-nolisten".into(),
        "tcp".into(),
    ])
}

/// The VNC server for the browser desktop: sets `password` (a fresh one for every
/// assignment) and makes sure a server listens on the port: one already there is kept (it
/// reads the new password at the next connection), else one is started as `user` when the
/// agent runs as root. The started server (if any) is returned; it is killed when dropped.
pub async fn prepare(
    config: &VncConfig,
    password_file: &Path,
    password: &str,
    user: Option<&str>,
) -> Result<Option<Child>, VncError> {
    write_password_file(password_file, password, user)?;
    if listening(config.port).await {
        return Ok(None);
    }
    let Some(argv) = start_command(config, password_file) else {
        return Err(VncError::NotListening(
            config.port,
            " (Xvnc is not on PATH and VNC_COMMAND is not set)",
        ));
    };
    let mut command = match (user, running_as_root()) {
        (Some(user), true) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(user).arg("--").args(&argv);
            c
        }
        _ => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    // The server runs for the whole session, as the desktop user: it must not hold the VM's
    // token (its environment is readable by that user).
    command
        .env_remove("API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| VncError::Start {
        program: argv[0].clone(),
        source,
    })?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if listening(config.port).await {
            tracing::info!(port = config.port, program = %argv[0], "VNC server started");
            return Ok(Some(child));
        }
        if let Ok(Some(status)) = child.try_wait() {
            tracing::warn!(%status, program = %argv[0], "the VNC server exited at start");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(VncError::NotListening(
        config.port,
        " (the VNC server did not start listening)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_file_is_what_vncpasswd_writes() {
        // `printf 123456 | vncpasswd -f | xxd -p` (TigerVNC 1.12).
        assert_eq!(
            password_file_bytes("123456"),
            [0x49, 0x40, 0x15, 0xf9, 0xa3, 0x5e, 0x8b, 0x22]
        );
        // Only 8 bytes count.
        assert_eq!(
            password_file_bytes("12345678"),
            password_file_bytes("123456789")
        );
        assert_eq!(password_of_pin("0123456789"), "01234567");
    }

    #[test]
    fn the_file_is_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vnc").join("passwd");
        write_password_file(&path, "111111", None).unwrap();
        write_password_file(&path, "222222", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), password_file_bytes("222222"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn xvnc_is_bound_to_loopback_with_vnc_authentication() {
        let config = VncConfig {
            command: Some(vec!["/opt/vnc/start".into(), "--fast".into()]),
            ..VncConfig::default()
        };
        assert_eq!(
            start_command(&config, Path::new("/p")).unwrap(),
            ["/opt/vnc/start", "--fast"]
        );
        let config = VncConfig::default();
        if let Some(argv) = start_command(&config, Path::new("/p")) {
            let line = argv.join(" ");
            assert!(
                line.contains(":1 -localhost -rfbport 5901 -rfbauth /p -SecurityTypes VncAuth"),
                "{line}"
            );
        }
    }
}
