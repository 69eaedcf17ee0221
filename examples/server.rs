//! The LabLink allocator server.
//!
//! ```text
//! cargo run --features server --example server                    # embedded default, no config
//! cargo run --features server --example server -- --config lablink.toml
//! cargo run --features server --example server -- validate --config lablink.toml
//! echo -n 'a long password' | cargo run --features server --example server -- hash-password
//! ```
//!
//! Configuration: a TOML or YAML file (`--config` or `LABLINK_CONFIG`) plus `LABLINK_*`
//! variables (see `lablink::config`). With none, the server runs on the embedded default:
//! in-memory store and notifier, a fake provisioner that needs no cloud, and an admin
//! password generated and printed once.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lablink::config::Config;
use lablink::http::{hash_password, HttpState};
use lablink::{Allocator, FakeProvisioner, LabLink};
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

async fn allocator(config: &Config) -> Result<Arc<dyn Allocator>, Box<dyn std::error::Error>> {
    let provisioner = FakeProvisioner::new()
        .with_latency(Duration::from_secs_f64(
            config.provisioner.fake_latency_seconds,
        ))
        .with_failure_rate(config.provisioner.fake_failure_rate);
    #[allow(unused_mut)]
    let mut builder = LabLink::builder()
        .with_config(config.allocator.clone())
        .with_provisioner(Arc::new(provisioner));
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
    Ok(Arc::new(builder.build()?))
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
    let state = HttpState::new(allocator(&config).await?, config.http_options(hash));
    let listener = tokio::net::TcpListener::bind(&config.server.listen).await?;
    let addr = listener.local_addr()?;
    print_banner(addr, &config, generated.as_deref());
    state.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
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
