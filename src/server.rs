//! A whole allocator built from a [`Config`]: store and notifier (memory or PostgreSQL), the
//! configured provisioner (EC2 calls wrapped in retry), the artifact store and collector,
//! the registered participants, the supervisor and the HTTP server, run until a shutdown
//! signal. The `lablink` binary and the `server` example are thin shells around it; an
//! embedder calls it, or composes the same parts itself.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use lablink::config::Config;
//! use lablink::server::{shutdown_signal, Server};
//!
//! let config = Config::default();
//! let hash = lablink::http::hash_password("a long admin password")?;
//! let listener = lablink::server::bind(config.server.listen.parse()?)?;
//! let server = Server::build(&config, hash, listener).await?;
//! println!("listening on {}", server.url());
//! server.run(shutdown_signal()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use lablink_core::{Allocator as _, LabLink, Provisioner};

use crate::config::Config;
use crate::http::{HttpState, Metrics, ReloadingCertResolver};
use crate::metered::{MeteredNotifier, MeteredProvisioner};
use crate::LocalProcessProvisioner;

/// What building or running a server can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An allocator server, built and ready to serve.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    lablink: LabLink,
    state: HttpState,
    local: Option<LocalProcessProvisioner>,
    tls: Option<Arc<ReloadingCertResolver>>,
}

impl Server {
    /// Builds everything `config` describes, serving on `listener`, with the admin password
    /// whose argon2 hash is `admin_password_hash`. Migrates the PostgreSQL schema when a
    /// database is configured and stores the configured registered participants when the
    /// store holds no list yet. Nothing is served and no supervisor runs until
    /// [`run`](Self::run).
    pub async fn build(
        config: &Config,
        admin_password_hash: String,
        listener: tokio::net::TcpListener,
    ) -> Result<Self, BoxError> {
        let addr = listener.local_addr()?;
        // Certificate files that are missing or bad stop the start, before anything else.
        let tls = match &config.server.tls {
            Some(tls) => Some(Arc::new(ReloadingCertResolver::load(tls)?)),
            None => None,
        };
        // One set of metrics for the routes and the metered provisioner and notifier.
        let metrics = Arc::new(Metrics::default());
        let (provisioner, local) = provisioner(config, addr, tls.is_some()).await?;
        let provisioner = Arc::new(MeteredProvisioner::new(
            provisioner,
            config.provisioner.kind(),
            metrics.clone(),
        ));
        let collector = Arc::new(crate::collect::Collector::new(
            config.collect.artifact_store().await?,
            config.collect.settings.clone(),
        ));
        let lablink = allocator(config, provisioner, collector.clone(), &metrics).await?;
        seed_roster(config, &lablink).await?;
        // The routes' destroys collect first through the state's CollectingAllocator.
        let state = HttpState::with_metrics(
            Arc::new(lablink.clone()),
            config.http_options(admin_password_hash),
            collector,
            metrics,
        );
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(Self {
            listener,
            addr,
            lablink,
            state,
            local,
            tls,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL: `https://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The HTTP state (allocator, options, metrics, collector).
    pub fn state(&self) -> &HttpState {
        &self.state
    }

    /// Starts the supervisor and serves until `shutdown` resolves; then ends held requests,
    /// finishes the others, stops the supervisor and the local agent processes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BoxError> {
        let supervisor = self.lablink.start_supervisor()?;
        let served = match self.tls {
            Some(certificates) => {
                self.state
                    .serve_tls(self.listener, certificates, shutdown)
                    .await
            }
            None => self.state.serve(self.listener, shutdown).await,
        };
        supervisor.stop().await;
        if let Some(local) = self.local {
            local.shutdown().await;
        }
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The configured provisioner, and the local one again when it is that (stopped at exit);
/// local agents reach the allocator at `addr` (over HTTPS with `tls`: its certificate must
/// be one they trust).
async fn provisioner(
    config: &Config,
    addr: SocketAddr,
    tls: bool,
) -> Result<(Arc<dyn Provisioner>, Option<LocalProcessProvisioner>), BoxError> {
    let mut url_addr = addr;
    if url_addr.ip().is_unspecified() {
        url_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if tls { "https" } else { "http" };
    Ok(config
        .provisioner
        .build(&format!("{scheme}://{url_addr}"))
        .await?)
}

/// The allocator on the configured store and notifier (PostgreSQL migrated first); the
/// notifier's resyncs are counted into `metrics`.
async fn allocator(
    config: &Config,
    provisioner: Arc<dyn Provisioner>,
    collector: Arc<crate::collect::Collector>,
    metrics: &Arc<Metrics>,
) -> Result<LabLink, BoxError> {
    #[allow(unused_mut)]
    let mut notifier: Arc<dyn lablink_core::Notifier> =
        Arc::new(lablink_core::MemoryNotifier::default());
    let mut builder = LabLink::builder()
        .with_config(config.allocator.clone())
        .with_provisioner(provisioner)
        // The supervisor's own destroys (scheduled destruction, idle release) collect first
        // too, when destroy_collects_first is on.
        .with_before_destroy(collector);
    #[cfg(feature = "postgres")]
    if !config.database.url.is_empty() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.database.max_connections)
            .connect(&config.database.url)
            .await?;
        lablink_postgres::setup(&pool).await?;
        notifier = Arc::new(lablink_postgres::PgNotifier::connect(pool.clone()).await?);
        builder = builder.with_store(Arc::new(lablink_postgres::PgVmStore::new(pool)));
    }
    builder = builder.with_notifier(Arc::new(MeteredNotifier::new(notifier, metrics.clone())));
    tracing::info!(
        store = if config.database.url.is_empty() {
            "memory"
        } else {
            "postgres"
        },
        provisioner = config.provisioner.kind(),
        "allocator configured"
    );
    Ok(builder.build()?)
}

/// Stores the configured registered participants, unless the store already holds a list
/// (one uploaded in the admin UI wins over the file, which gives only the first list).
async fn seed_roster(config: &Config, lablink: &LabLink) -> Result<(), BoxError> {
    let emails = config.participants.emails().map_err(|p| p.join("; "))?;
    if !emails.is_empty() && lablink.roster().await?.is_empty() {
        lablink.set_roster(&emails).await?;
    }
    Ok(())
}

/// How many connections may wait to be accepted: a room of participants pressing "get a VM"
/// at once opens that many, and the usual default of 128 drops the rest for a one-second
/// retry (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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
