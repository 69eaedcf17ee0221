//! `lablink`: the allocator server, its configuration check, the password hasher, and the VM
//! agent (what the local provisioner starts), in one program.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lablink::config::Config;
use lablink::http::hash_password;
use lablink::server::{shutdown_signal, Server};
use rand::distributions::{Alphanumeric, DistString};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc malloc: every waiting agent holds a connection with hyper's
/// mostly empty 8 KiB read and write buffers, which glibc keeps resident and jemalloc does
/// not (10,000 held requests: 18.1 KiB each with glibc; see BENCHMARKS.md, W2).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LABLINK_GIT_COMMIT"),
    ")"
);

/// LabLink hands cloud VMs to workshop participants: this program is the allocator (the
/// server participants and admins use), and the agent that runs on each VM.
#[derive(Debug, Parser)]
#[command(name = "lablink", version = VERSION, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// The configuration file, for the commands that read one.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// A TOML or YAML configuration file; `LABLINK_*` variables override it
    /// (`LABLINK_SERVER__LISTEN=0.0.0.0:8080`). Without one: the embedded default, an
    /// in-memory allocator whose VMs are agent processes on this machine.
    #[arg(short, long, env = "LABLINK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the allocator (the default): participant page at /, admin UI at /admin, API at
    /// /api/v1, until Ctrl-C or SIGTERM.
    Serve(ConfigArg),
    /// Check the configuration and print every problem at once (and warnings); exit 1 when
    /// there is a problem.
    Validate(ConfigArg),
    /// Read a password on standard input and print its argon2 hash for
    /// `[admin] password_hash`.
    HashPassword,
    /// Run the VM agent (configured by its environment: ALLOCATOR_URL, VM_NAME, API_TOKEN...);
    /// the local provisioner starts this program so.
    Agent,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ConfigArg {
        config: std::env::var_os("LABLINK_CONFIG").map(PathBuf::from),
    })) {
        Command::Agent => runtime(false).map_or(ExitCode::FAILURE, |rt| {
            rt.block_on(lablink_agent::main_from_env())
        }),
        Command::HashPassword => hash_from_stdin(),
        Command::Validate(args) => match load(args.config) {
            Some(config) => {
                for warning in config.warnings() {
                    println!("warning: {warning}");
                }
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            None => ExitCode::FAILURE,
        },
        Command::Serve(args) => {
            let Some(config) = load(args.config) else {
                return ExitCode::FAILURE;
            };
            let Some(rt) = runtime(true) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "the server stopped with an error");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime(multi_thread: bool) -> Option<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("cannot start the runtime: {e}"))
        .ok()
}

fn hash_from_stdin() -> ExitCode {
    let mut password = String::new();
    if std::io::stdin().read_to_string(&mut password).is_err() || password.trim().is_empty() {
        eprintln!("give the password on standard input");
        return ExitCode::from(2);
    }
    match hash_password(password.trim_end_matches(['\n', '\r'])) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration, or `None` after printing every problem.
fn load(path: Option<PathBuf>) -> Option<Config> {
    match Config::load(path.as_deref(), std::env::vars()) {
        Ok(config) => Some(config),
        Err(problems) => {
            eprintln!("the configuration has {} problem(s):", problems.len());
            for problem in problems {
                eprintln!("  - {problem}");
            }
            None
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

async fn serve(config: Config) -> Result<(), lablink::server::BoxError> {
    init_tracing(&config);
    // Under systemd, standard output is the journal: a generated password printed there
    // would be kept and readable by every member of its readers' group.
    if !config.has_admin_password() && std::env::var_os("JOURNAL_STREAM").is_some() {
        return Err(
            "no admin password is configured, and under systemd a generated one would \
                    be written to the journal: set [admin] password_hash (lablink hash-password)"
                .into(),
        );
    }
    let generated = (!config.has_admin_password())
        .then(|| Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20));
    let hash = match (&generated, config.admin.password_hash.is_empty()) {
        (Some(password), _) => hash_password(password)?,
        (None, true) => hash_password(&config.admin.password)?,
        (None, false) => config.admin.password_hash.clone(),
    };
    let listener = lablink::server::bind(config.server.listen.parse()?)?;
    let server = Server::build(&config, hash, listener).await?;
    print_banner(&server.url(), &config, generated.as_deref());
    server.run(shutdown_signal()).await
}

/// The one-time banner: where to go, and the generated password (never logged).
fn print_banner(base: &str, config: &Config, generated: Option<&str>) {
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
