//! The LabLink allocator server.
//!
//! ```text
//! cargo run --example server                    # embedded default, no config
//! cargo run --example server -- --config lablink.toml
//! cargo run --example server -- validate --config lablink.toml
//! echo -n 'a long password' | cargo run --example server -- hash-password
//! ```
//!
//! Configuration: a TOML or YAML file (`--config` or `LABLINK_CONFIG`) plus `LABLINK_*`
//! variables (see `lablink::config`). With none, the server runs on the embedded default:
//! in-memory store and notifier, VMs that are agent processes on this machine (this same
//! executable run as `server agent`, which is the `lablink-agent` program, starting no real
//! Chrome Remote Desktop), and an admin password generated and printed once.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc rather than glibc malloc: every waiting agent holds a connection with hyper's
/// mostly empty 8 KiB read and write buffers, which glibc keeps resident and jemalloc does
/// not (10,000 held requests: 18.1 KiB each with glibc; see BENCHMARKS.md, W2).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use lablink::config::Config;
use lablink::http::{hash_password, HttpState};
use lablink::{FakeProvisioner, LabLink, LocalProcessProvisioner, Provisioner};
use rand::distributions::{Alphanumeric, DistString};
use tracing_subscriber::EnvFilter;

#[derive(Debug, PartialEq)]
enum Command {
    Serve,
    Validate,
    HashPassword,
}

fn parse_args() -> Result<(Command, Option<PathBuf>), String> {
    let mut command = Command::Serve;
    let mut config = std::env::var_os("LABLINK_CONFIG").map(PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "validate" => command = Command::Validate,
            "hash-password" => command = Command::HashPassword,
            "serve" => command = Command::Serve,
            "--config" | "-c" => {
                config = Some(args.next().ok_or("--config needs a path")?.into());
            }
            "--help" | "-h" => {
                return Err("usage: server [serve|validate|hash-password] [--config FILE]".into())
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok((command, config))
}

fn main() -> ExitCode {
    // The local provisioner's VMs: this executable, run as the agent.
    if std::env::args().nth(1).as_deref() == Some("agent") {
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(lablink_agent::main_from_env()),
            Err(e) => {
                eprintln!("cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (command, path) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if command == Command::HashPassword {
        let mut password = String::new();
        if std::io::stdin().read_to_string(&mut password).is_err() || password.trim().is_empty() {
            eprintln!("give the password on standard input");
            return ExitCode::from(2);
        }
        return match hash_password(password.trim_end_matches(['\n', '\r'])) {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(path.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("the configuration has {} problem(s):", problems.len());
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    if command == Command::Validate {
        for warning in config.warnings() {
            println!("warning: {warning}");
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the server stopped with an error");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_new(&config.log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The configured provisioner, and the local one again when it is that (stopped at exit).
type Provisioners = (Arc<dyn Provisioner>, Option<LocalProcessProvisioner>);

/// The configured provisioner; local agents reach the allocator at `addr`.
async fn provisioner(
    config: &Config,
    addr: SocketAddr,
) -> Result<Provisioners, Box<dyn std::error::Error>> {
    let p = &config.provisioner;
    // EC2 (feature `aws`): capacity and throttling errors are retried with backoff.
    #[cfg(feature = "aws")]
    if p.kind == "aws" {
        let ec2 = Arc::new(p.aws.builder().build().await?);
        let retry = lablink::RetryProvisioner::new(ec2, lablink::RetryPolicy::default());
        return Ok((Arc::new(retry), None));
    }
    if p.kind == "fake" {
        let mut fake = FakeProvisioner::new()
            .with_latency(Duration::from_secs_f64(p.fake_latency_seconds))
            .with_failure_rate(p.fake_failure_rate);
        if !p.fake_inventory_dir.is_empty() {
            std::fs::create_dir_all(&p.fake_inventory_dir)?;
            fake = fake.with_inventory_dir(&p.fake_inventory_dir);
        }
        return Ok((Arc::new(fake), None));
    }
    let mut url_addr = addr;
    if url_addr.ip().is_unspecified() {
        url_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{url_addr}");
    let mut builder = if p.local_agent_program.is_empty() {
        LocalProcessProvisioner::builder(std::env::current_exe()?, url).arg("agent")
    } else {
        LocalProcessProvisioner::builder(&p.local_agent_program, url)
    };
    builder = builder.env("LABLINK_START_HOST", &p.local_start_host);
    if !p.local_log_dir.is_empty() {
        std::fs::create_dir_all(&p.local_log_dir)?;
        builder = builder.log_dir(&p.local_log_dir);
    }
    let local = builder.build();
    Ok((Arc::new(local.clone()), Some(local)))
}

/// The allocator; its supervisor is started by `serve` once the HTTP state has installed
/// the collector, so an automatic destroy never runs before it can collect first.
async fn allocator(
    config: &Config,
    provisioner: Arc<dyn Provisioner>,
) -> Result<LabLink, Box<dyn std::error::Error>> {
    #[allow(unused_mut)]
    let mut builder = LabLink::builder()
        .with_config(config.allocator.clone())
        .with_provisioner(provisioner);
    #[cfg(feature = "postgres")]
    if !config.database.url.is_empty() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.database.max_connections)
            .connect(&config.database.url)
            .await?;
        lablink::postgres::setup(&pool).await?;
        let notifier = lablink::postgres::PgNotifier::connect(pool.clone()).await?;
        builder = builder
            .with_store(Arc::new(lablink::postgres::PgVmStore::new(pool)))
            .with_notifier(Arc::new(notifier));
    }
    tracing::info!(
        store = if config.database.url.is_empty() { "memory" } else { "postgres" },
        provisioner = %config.provisioner.kind,
        "allocator configured"
    );
    Ok(builder.build()?)
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    init_tracing(&config);
    let generated = (!config.has_admin_password())
        .then(|| Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20));
    let hash = match (&generated, config.admin.password_hash.is_empty()) {
        (Some(password), _) => hash_password(password)?,
        (None, true) => hash_password(&config.admin.password)?,
        (None, false) => config.admin.password_hash.clone(),
    };
    let listener = tokio::net::TcpListener::bind(&config.server.listen).await?;
    let addr = listener.local_addr()?;
    let (provisioner, local) = provisioner(&config, addr).await?;
    let lablink = allocator(&config, provisioner).await?;
    let collector = lablink::collect::Collector::new(
        config.collect.artifact_store().await?,
        config.collect.settings(),
    );
    let state = HttpState::with_collector(
        Arc::new(lablink.clone()),
        config.http_options(hash),
        Arc::new(collector),
    );
    // After the collector is installed: the supervisor's first tick may already be due to
    // destroy (scheduled destruction, idle release).
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    seed_roster(&config, &lablink).await?;
    let supervisor = lablink.start_supervisor()?;
    print_banner(addr, &config, generated.as_deref());
    let served = state.serve(listener, shutdown_signal()).await;
    supervisor.stop().await;
    if let Some(local) = local {
        local.shutdown().await;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Stores the configured registered participants, unless the store already holds a list
/// (one uploaded in the admin UI wins over the file, which gives only the first list).
async fn seed_roster(config: &Config, lablink: &LabLink) -> Result<(), Box<dyn std::error::Error>> {
    use lablink::Allocator as _;
    let emails = config.participants.emails().map_err(|p| p.join("; "))?;
    if !emails.is_empty() && lablink.roster().await?.is_empty() {
        lablink.set_roster(&emails).await?;
    }
    Ok(())
}

/// The one-time banner: where to go, and the generated password (never logged).
fn print_banner(addr: SocketAddr, config: &Config, generated: Option<&str>) {
    let base = format!("http://{addr}");
    println!("LabLink allocator listening on {base}");
    println!("  participant page: {base}/");
    println!("  admin UI:         {base}/admin");
    println!("  API document:     {base}/api/v1/openapi.json");
    match generated {
        Some(password) => {
            println!("  admin user:       {}", config.admin.user);
            println!("  admin password:   {password}");
            println!("  (generated for this run and shown only once; set admin.password_hash to keep one)");
        }
        None => println!(
            "  admin user:       {} (password from the configuration)",
            config.admin.user
        ),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
