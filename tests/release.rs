//! The release tarball as someone without a Rust toolchain uses it: `scripts/release.sh`
//! packs the allocator and the agent with a `SHA256SUMS`; the allocator tarball, unpacked
//! into an empty directory, installs with its own `install.sh` into a staging root (checking
//! the checksum, never calling `useradd` or `systemctl`, never overwriting a configuration);
//! the installed program serves with the installed sample configuration and exits 0 on
//! SIGTERM; and `systemd-analyze verify` accepts the installed unit.
//!
//! The script packs the test run's own debug build (`LABLINK_RELEASE_PROFILE=dev`, the
//! features of `scripts/test.sh`, and `--example server` so that dev-dependencies' features are
//! unified as in `cargo test`: the build lablink-proof/tests/proof.rs makes), so this adds no release build. Needs `systemd-analyze` (Debian: package `systemd`); it fails naming it otherwise.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bounds on waiting; a hang fails the test instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(60);

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one file in `dir` whose name starts with `prefix` and ends with `.tar.gz`.
fn tarball(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".tar.gz")
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{prefix}*.tar.gz in {}: {found:?}",
        dir.display()
    );
    found[0].clone()
}

/// The server process; killed on drop if still running.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /healthz` over plain HTTP/1.1: the status line, or `None` when nothing answers yet.
fn healthz(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_owned)
}

#[test]
fn the_release_tarball_installs_serves_stops_cleanly_and_its_unit_verifies() {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "systemd-analyze is needed to verify the systemd unit (Debian: apt-get install systemd): {other:?}"
        ),
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");

    // 1. The release, from the debug build the test run already made.
    let out = run(Command::new("bash")
        .arg(repo.join("scripts/release.sh"))
        .env("LABLINK_RELEASE_PROFILE", "dev")
        .env("LABLINK_RELEASE_FEATURES", "all")
        .env("LABLINK_RELEASE_CARGO_ARGS", "--example server")
        .env("LABLINK_RELEASE_OUT", &dist)
        .stderr(Stdio::inherit()));
    let version = env!("CARGO_PKG_VERSION");
    let agent = tarball(&dist, &format!("lablink-agent-{version}-"));
    let server = tarball(&dist, &format!("lablink-{version}-"));
    for path in [&server, &agent] {
        assert!(
            stdout(&out).contains(&path.display().to_string()),
            "release.sh does not say where {} is:\n{}",
            path.display(),
            stdout(&out)
        );
    }
    run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist));
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "SHA256SUMS:\n{sums}");
    let server_files = stdout(&run(Command::new("tar").arg("-tzf").arg(&server)));
    for file in [
        "monitoring/lablink-dashboard.json",
        "monitoring/lablink-alerts.yml",
        // The browser desktop's noVNC, with its licences.
        "novnc/core/rfb.js",
        "novnc/LICENSE.txt",
        "novnc/docs/LICENSE.MPL-2.0",
        "novnc/vendor/pako/LICENSE",
    ] {
        assert!(server_files.lines().any(|l| l == file), "{server_files}");
    }
    let agent_files = stdout(&run(Command::new("tar").arg("-tzf").arg(&agent)));
    assert!(
        agent_files.lines().any(|l| l == "bin/lablink-agent"),
        "{agent_files}"
    );

    // 2. Unpacked into an empty directory (next to SHA256SUMS, where install.sh looks) and
    //    installed into a staging root. useradd and systemctl must not be called: stand-ins
    //    that leave a mark come first on PATH.
    let unpacked = dist.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&server)
        .arg("-C")
        .arg(&unpacked));
    let fake_bin = tmp.path().join("fake-bin");
    let marks = tmp.path().join("called");
    std::fs::create_dir(&fake_bin).unwrap();
    for tool in ["useradd", "systemctl", "groupadd", "chgrp"] {
        let path = fake_bin.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho {tool} >> '{}'\n", marks.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path_var = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let root = tmp.path().join("root");
    let install = || {
        run(Command::new("bash")
            .arg(unpacked.join("install.sh"))
            .arg("--root")
            .arg(&root)
            .env("PATH", &path_var))
    };
    let installed = stdout(&install());
    assert!(installed.contains("checksum OK"), "{installed}");
    assert!(
        !marks.exists(),
        "install.sh --root called {}",
        std::fs::read_to_string(&marks).unwrap()
    );
    let binary = root.join("usr/local/bin/lablink");
    let config = root.join("etc/lablink/lablink.toml");
    let unit = root.join("etc/systemd/system/lablink.service");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the configuration holds secrets");
    // A second install keeps the configuration the admin edited.
    let edited = format!(
        "{}\n[admin]\nuser = \"workshop-admin\"\n",
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("[admin]\n", "")
    );
    std::fs::write(&config, &edited).unwrap();
    let again = stdout(&install());
    assert!(again.contains("kept the existing"), "{again}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    run(Command::new(&binary)
        .args(["validate", "--config"])
        .arg(&config));

    // 3. The installed program serves with the installed configuration, in an empty working
    //    directory, and exits 0 on SIGTERM.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut command = Command::new(&binary);
    for (key, _) in std::env::vars() {
        if key.starts_with("LABLINK_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    let child = command
        .args(["serve", "--config"])
        .arg(&config)
        .env("LABLINK_SERVER__LISTEN", "127.0.0.1:0")
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let mut server = Server(child);
    let (tx, lines) = mpsc::channel();
    let out = server.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The banner: the address, then the admin user (the installed configuration's).
    let mut banner: Vec<String> = Vec::new();
    while !banner.iter().any(|l| l.contains("admin user:")) {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) => banner.push(line),
            Err(e) => panic!("the banner stops ({e}): {banner:?}"),
        }
    }
    let addr = banner
        .iter()
        .find_map(|l| l.strip_prefix("LabLink allocator listening on http://"))
        .unwrap_or_else(|| panic!("the banner names no address: {banner:?}"))
        .trim()
        .to_owned();
    assert!(
        banner.iter().any(|l| l.contains("workshop-admin")),
        "the server did not read the installed configuration: {banner:?}"
    );
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        match healthz(&addr) {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("nothing answered GET /healthz on {addr}"),
        }
    };
    assert!(status.starts_with("HTTP/1.1 200"), "GET /healthz: {status}");
    run(Command::new("kill").args(["-TERM", &server.0.id().to_string()]));
    let deadline = Instant::now() + PATIENCE;
    let exit = loop {
        if let Some(exit) = server.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the server ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0), "exit after SIGTERM: {exit}");

    // 4. systemd accepts the installed unit. `verify` checks that ExecStart's program exists,
    //    so it reads a copy whose ExecStart is the program installed under the root.
    let installed_unit = std::fs::read_to_string(&unit).unwrap();
    let exec = "ExecStart=/usr/local/bin/lablink ";
    assert!(installed_unit.contains(exec), "{installed_unit}");
    let check = tmp.path().join("verify/lablink.service");
    std::fs::create_dir(check.parent().unwrap()).unwrap();
    std::fs::write(
        &check,
        installed_unit.replace(exec, &format!("ExecStart={} ", binary.display())),
    )
    .unwrap();
    let verify = run(Command::new("systemd-analyze").arg("verify").arg(&check));
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        !complaints.contains("lablink.service"),
        "systemd-analyze verify complains about the unit:\n{complaints}"
    );
}
