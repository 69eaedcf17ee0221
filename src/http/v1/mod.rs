//! docs/protocol.md, part B: the versioned `/api/v1` surface for our agent and integrators,
//! documented by an OpenAPI document generated from these handlers (utoipa) and served at
//! `/api/v1/openapi.json`.

mod admin;
mod agent;
mod settings;

use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::extract::typed;
use super::HttpState;

pub use admin::destroy;
pub use agent::wait_assignment;

/// The OpenAPI document of `/api/v1`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "LabLink allocator API", version = "1", description = "Versioned API of the LabLink allocator. Agent routes take the VM's bearer token; admin routes take HTTP Basic (with `Accept: application/json`) or a browser session with its `X-CSRF-Token`."),
    paths(
        agent::ready, agent::wait_assignment, agent::heartbeat, agent::telemetry,
        admin::request_vm, admin::list_vms, admin::get_vm, admin::vm_logs, admin::launch,
        admin::destroy, admin::reboot, admin::release, admin::operations, admin::operation,
        admin::pool, openapi_json,
        crate::http::collect::tasks, crate::http::collect::upload, crate::http::collect::list,
        crate::http::collect::one, crate::http::collect::request, crate::http::collect::download,
        crate::http::roster::get_roster, crate::http::roster::put_roster,
        crate::http::registration::register, crate::http::registration::unregister,
        crate::http::registration::create_token, crate::http::registration::list_tokens,
        crate::http::registration::revoke_token, crate::http::audit_log::list,
        settings::get_settings, settings::put_settings,
        crate::http::warnings::participant_warnings, crate::http::warnings::acknowledge,
        crate::http::export::usage, crate::http::export::export,
        crate::http::participant::status, crate::http::participant::new_command,
        crate::http::participant::release,
    ),
    modifiers(&Security),
    tags(
        (name = "agent", description = "Called by the agent inside a VM"),
        (name = "participant", description = "Called for participants"),
        (name = "admin", description = "Called by admins and scripts"),
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "agent_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "registration_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "admin_basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

/// Every error: `{"error": "<human message>"}`.
pub use lablink_protocol::ErrorBody;

/// The `/api/v1` routes that answer at once (the wait is routed as a held request).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/vms/{hostname}/ready", post(agent::ready))
        .route("/api/v1/vms/{hostname}/heartbeat", post(agent::heartbeat))
        .route("/api/v1/vms/{hostname}/telemetry", post(agent::telemetry))
        .route("/api/v1/requests", post(admin::request_vm))
        .route("/api/v1/vms", get(admin::list_vms))
        .route("/api/v1/vms/{hostname}", get(admin::get_vm))
        .route("/api/v1/vms/{hostname}/logs", get(admin::vm_logs))
        .route("/api/v1/vms/{hostname}/reboot", post(admin::reboot))
        .route("/api/v1/vms/{hostname}/release", post(admin::release))
        .route("/api/v1/launch", post(admin::launch))
        .route("/api/v1/operations", get(admin::operations))
        .route("/api/v1/operations/{id}", get(admin::operation))
        .route("/api/v1/pool", get(admin::pool))
        .route(
            "/api/v1/settings",
            get(settings::get_settings).put(settings::put_settings),
        )
        .route(
            "/api/v1/collections",
            get(crate::http::collect::list).post(crate::http::collect::request),
        )
        .route(
            "/api/v1/collections/{hostname}",
            get(crate::http::collect::one),
        )
        .route("/api/v1/usage", get(crate::http::export::usage))
        .route("/api/v1/export", get(crate::http::export::export))
}

/// The OpenAPI document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "admin",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
