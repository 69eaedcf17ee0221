//! A host app that serves LabLink next to its own routes, composed from library parts: the
//! default allocator on in-memory parts, its supervisor, and the HTTP router mounted into the
//! app's own axum router. (The `lablink` program builds the same from a configuration file
//! with `lablink::server::Server`.)
//!
//! ```text
//! LABLINK_EXAMPLE_PASSWORD='a long admin password' cargo run --example server
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use lablink::http::{HttpOptions, HttpState};
use lablink::{FakeProvisioner, LabLink};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let password = std::env::var("LABLINK_EXAMPLE_PASSWORD")
        .unwrap_or_else(|_| "change this example password".into());
    // The parts: any store, notifier and provisioner (here the in-memory ones and a fake
    // cloud), wrapped as the host app likes before the HTTP layer takes them.
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(FakeProvisioner::new()))
        .build()?;
    let supervisor = lablink.start_supervisor()?;
    let state = HttpState::new(
        Arc::new(lablink),
        HttpOptions::with_admin_password("admin", &password)?,
    );
    // The host app's own page beside LabLink's routes.
    let app = axum::Router::new()
        .route("/host", get(|| async { "the host app's own page" }))
        .merge(state.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!(
        "LabLink inside a host app on http://{} (admin: admin)",
        listener.local_addr()?
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(lablink::server::shutdown_signal())
    .await?;
    state.shutdown();
    supervisor.stop().await;
    Ok(())
}
