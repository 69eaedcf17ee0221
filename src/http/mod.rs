//! The allocator's HTTP layer: an axum [`Router`] any host app can mount.
//!
//! It serves the compatibility routes of docs/protocol.md, part A (so VMs built for the Python
//! client work unchanged), the versioned `/api/v1` surface with its OpenAPI document, the
//! participant page (`/`), the admin UI (`/admin`), `/healthz` and `/metrics`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use lablink::http::{HttpOptions, HttpState};
//!
//! let allocator = Arc::new(lablink::LabLink::builder().build()?);
//! let options = HttpOptions::with_admin_password("admin", "correct horse battery")?;
//! let state = HttpState::new(allocator, options);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // Or mount `state.router()` into your own axum app.
//! state.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Long-held requests (`/vm_startup`, the v1 wait, the admin event stream) live only in
//! their handler future: nothing is spawned per waiter, and a client that disconnects frees
//! its waiter when axum drops the future. [`HttpState::shutdown`] ends them all at once for a
//! graceful shutdown.

mod admin_auth;
mod admin_ui;
mod agent_auth;
mod audit;
mod audit_log;
mod client;
mod collect;
mod compat;
mod compat_admin;
mod desktop;
mod error;
mod export;
mod extract;
mod live;
mod metrics;
mod middleware;
mod options;
mod participant;
mod public;
mod registration;
mod roster;
mod serve;
mod settings;
mod signed;
mod templates;
mod tls;
mod v1;
mod views;
mod warnings;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use lablink_core::Allocator;

use crate::collect::CollectingAllocator;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use admin_auth::hash_password;
pub use client::RateLimit;
pub use desktop::{DesktopOptions, Relay};
pub use error::{status_for, ApiError, ApiResult};
pub use live::MAX_LIVE_VIEWS;
pub use metrics::Metrics;
pub use options::{AgentAuthMode, HttpOptions};
pub use signed::CookieKey;
pub use tls::{ReloadingCertResolver, ServedOverTls, TlsConfig, TlsError};
/// The rustls [`ReloadingCertResolver`] and [`ReloadingCertResolver::server_config`] work with.
pub use tokio_rustls::rustls;
pub use v1::ApiDoc;

/// Everything the handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

/// Failed machine registrations allowed per client address and minute (a lab registering
/// its machines from behind one address only spends on failures).
const REGISTRATION_FAILURES_PER_MINUTE: u32 = 30;

#[derive(Debug)]
struct Inner {
    allocator: Arc<CollectingAllocator>,
    options: HttpOptions,
    metrics: Arc<Metrics>,
    admin: admin_auth::AdminAuth,
    templates: templates::Templates,
    shutdown: watch::Sender<bool>,
    /// The admin dashboard's rows and fragments, rendered once for every viewer.
    live: Arc<live::LiveView>,
    /// VM requests per client address.
    participants: client::RateLimiter,
    /// Failed machine registrations per client address.
    registrations: client::RateLimiter,
    /// The browser desktop's relay: browsers waiting for their VM's tunnel, live sessions.
    desktop: desktop::Relay,
}

impl HttpState {
    /// The state for `allocator` with `options`; collections use the default settings and
    /// are kept in memory (see [`with_collector`](Self::with_collector)).
    pub fn new(allocator: Arc<dyn Allocator>, options: HttpOptions) -> Self {
        Self::with_collector(allocator, options, Arc::default())
    }

    /// The state for `allocator` with `options`, collecting participants' work with
    /// `collector`: the routes use `allocator` wrapped in a [`CollectingAllocator`], so every
    /// destroy collects first when
    /// [`destroy_collects_first`](crate::collect::CollectSettings::destroy_collects_first) is on.
    /// The supervisor's own destroys collect when `collector` is also its
    /// [`BeforeDestroy`](lablink_core::BeforeDestroy) step
    /// ([`LabLinkBuilder::with_before_destroy`](lablink_core::LabLinkBuilder::with_before_destroy)).
    pub fn with_collector(
        allocator: Arc<dyn Allocator>,
        options: HttpOptions,
        collector: Arc<crate::collect::Collector>,
    ) -> Self {
        Self::with_metrics(allocator, options, collector, Arc::default())
    }

    /// Like [`with_collector`](Self::with_collector), counting into `metrics`: the ones the
    /// allocator's [`MeteredProvisioner`](crate::metered::MeteredProvisioner) and
    /// [`MeteredNotifier`](crate::metered::MeteredNotifier) count into, so `/metrics` shows
    /// theirs too.
    pub fn with_metrics(
        allocator: Arc<dyn Allocator>,
        options: HttpOptions,
        collector: Arc<crate::collect::Collector>,
        metrics: Arc<Metrics>,
    ) -> Self {
        if options.agent_auth == AgentAuthMode::Open {
            tracing::warn!(
                "agent auth is OPEN: VM routes accept requests without a token; use only for local demos"
            );
        }
        let admin = admin_auth::AdminAuth::new(&options);
        Self {
            inner: Arc::new(Inner {
                participants: client::RateLimiter::new(options.participant_limit),
                registrations: client::RateLimiter::new(client::RateLimit {
                    burst: REGISTRATION_FAILURES_PER_MINUTE,
                    per_minute: REGISTRATION_FAILURES_PER_MINUTE,
                }),
                allocator: Arc::new(CollectingAllocator::new(allocator, collector)),
                metrics,
                admin,
                templates: templates::Templates::new(),
                shutdown: watch::channel(false).0,
                live: Arc::default(),
                desktop: desktop::Relay::new(&options.desktop),
                options,
            }),
        }
    }

    /// The allocator behind the routes (its destroy collects first).
    pub fn allocator(&self) -> &Arc<CollectingAllocator> {
        &self.inner.allocator
    }

    /// The options.
    pub fn options(&self) -> &HttpOptions {
        &self.inner.options
    }

    /// The collector of participants' work.
    pub fn collector(&self) -> &Arc<crate::collect::Collector> {
        self.inner.allocator.collector()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The browser desktop's relay (what it moved, its live sessions).
    pub fn desktop_relay(&self) -> &Relay {
        &self.inner.desktop
    }

    /// The client's address: the peer, or what a trusted proxy says it forwarded for.
    pub(crate) fn client_addr(&self, parts: &axum::http::request::Parts) -> std::net::IpAddr {
        client::client_addr(parts, &self.inner.options.trusted_proxies)
    }

    /// Whether the client's request was HTTPS (so cookies get `Secure`).
    pub(crate) fn is_https(&self, parts: &axum::http::request::Parts) -> bool {
        self.inner.options.secure_cookies
            || parts.extensions.get::<ServedOverTls>().is_some()
            || client::forwarded_https(parts, &self.inner.options.trusted_proxies)
    }

    /// Ends every held request (waiters answer "not assigned yet", event streams close), so
    /// a graceful shutdown does not wait for them.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Resolves once [`shutdown`](Self::shutdown) was called.
    pub(crate) async fn shutting_down(&self) {
        let mut rx = self.inner.shutdown.subscribe();
        // An error means the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Serves [`router`](Self::router) on `listener` (HTTP/1, with client addresses for
    /// [`ConnectInfo`](axum::extract::ConnectInfo)) until `stop` resolves; then ends held
    /// requests ([`shutdown`](Self::shutdown)), stops accepting, lets the other requests
    /// finish, and returns once every connection is closed.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_on(listener, None, stop).await
    }

    /// Like [`serve`](Self::serve), over TLS with `certificates` (HTTP/1.1; a handshake
    /// has 10 seconds; requests count as HTTPS, so cookies get `Secure`). While serving,
    /// `certificates` [keeps reloading](ReloadingCertResolver::keep_reloading) its files, so
    /// a renewed certificate is served without a restart.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        certificates: Arc<ReloadingCertResolver>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(certificates.server_config());
        // Ends when serving ends, or when this future is dropped.
        let _reloading = tls::Reloading::spawn(certificates);
        self.serve_on(listener, Some(acceptor), stop).await
    }

    async fn serve_on(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        serve::serve(self.router(), listener, tls, stop, || {
            tracing::info!("shutting down: ending held requests, finishing the others");
            self.shutdown();
        })
        .await
    }

    /// The complete router: every route, with body limit, timeouts, request ids, tracing and
    /// metrics. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so failed
    /// admin sign-ins are rate-limited per client address.
    pub fn router(&self) -> Router {
        let held = Router::new()
            .route("/vm_startup", post(compat::vm_startup))
            .route(
                "/api/v1/vms/{hostname}/assignment",
                get(v1::wait_assignment),
            )
            .route("/admin/events", get(live::events))
            // Collections: long-poll, streamed uploads (no body limit but the VM's budget),
            // and destroys that may wait for collections first.
            .route("/api/v1/vms/{hostname}/tasks", get(collect::tasks))
            .route("/api/v1/destroy", post(v1::destroy))
            .route(
                "/api/v1/vms/{hostname}/registration",
                delete(registration::unregister),
            )
            .route("/destroy", post(compat_admin::destroy_all))
            .route(
                "/admin/destroy",
                get(admin_ui::confirm_destroy).post(admin_ui::destroy),
            )
            .route("/api/v1/collections.zip", get(collect::download))
            .route("/api/scp-client", get(collect::download))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                middleware::read_body_in_time,
            ));
        // Streamed uploads: no body read up front (their time is bounded per chunk by the
        // collector), so they join after the layer above.
        let held = held.route(
            "/api/v1/vms/{hostname}/collections/{id}",
            put(collect::upload).layer(DefaultBodyLimit::disable()),
        );
        let quick = Router::new()
            .merge(compat::routes())
            .merge(public::routes())
            .merge(compat_admin::routes())
            .merge(admin_ui::routes())
            .merge(roster::routes())
            .merge(settings::routes())
            .merge(warnings::routes())
            .merge(participant::routes())
            .merge(registration::routes())
            .merge(audit_log::routes())
            .merge(v1::routes())
            .route("/healthz", get(middleware::healthz))
            .route("/metrics", get(metrics::metrics))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                middleware::timeout,
            ));
        // The desktop's WebSockets bound their own waits (for the VM's tunnel) and then live
        // as long as the session, so neither the request timeout nor the body read applies.
        held.merge(quick)
            .merge(desktop::routes())
            .fallback(error::not_found_fallback)
            .method_not_allowed_fallback(error::method_not_allowed_fallback)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                metrics::count_requests,
            ))
            .layer(DefaultBodyLimit::max(self.inner.options.max_body_bytes))
            .layer(axum::middleware::from_fn(middleware::limit_head))
            .layer(PropagateRequestIdLayer::x_request_id())
            // 5xx answers are not logged as failures here: a 503 "no VM free" is an
            // answer, not an error, and anyone could flood the error log with it. Real
            // failures are logged where they happen (`ApiError::from`, the panic guard).
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(middleware::make_span)
                    .on_failure(()),
            )
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(axum::middleware::from_fn(middleware::check_request_id))
            .layer(CatchPanicLayer::custom(middleware::panic_response))
            .layer(axum::middleware::from_fn(middleware::security_headers))
            .with_state(self.clone())
    }
}
