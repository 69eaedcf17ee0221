//! `/api/v1` participant and admin routes: request a VM, list/read VMs and logs, launch,
//! destroy, reboot, release, operations with progress, pool settings.

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lablink_core::Allocator as _;
use lablink_core::{AuditAction, DestroyTarget, LaunchOptions, VmFilter};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{typed, ErrorBody};
use crate::http::admin_auth::{Admin, AdminForm};
use crate::http::agent_auth::AdminOrAgent;
use crate::http::audit::{self, Answered, What};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{vm_hostname, ApiQuery, FormOrJson, PathText};
use crate::http::public::take_vm;
use crate::http::views::{CountsView, LogsView, OperationView, VmView};
use crate::http::{AgentAuthMode, HttpState};

/// Body of a participant request (the schema of what [`take_vm`] reads).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct RequestBody {
    /// The participant's email.
    pub email: String,
    /// Their Chrome Remote Desktop command (must contain `--code`).
    pub crd_command: String,
    /// The event's access code, when the organisers set one.
    pub access_code: Option<String>,
}

/// The VM a participant got.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantedBody {
    /// The VM.
    pub hostname: String,
    /// The PIN for its remote desktop (a string of digits).
    pub pin: String,
    /// `false` when this email already held the VM.
    pub newly_assigned: bool,
}

/// Gives the participant a VM (the same one again for the same email).
#[utoipa::path(post, path = "/api/v1/requests", tag = "participant", request_body = RequestBody,
    responses((status = 200, description = "The VM; sets the participant cookie that a repeat for this email must send", body = GrantedBody), (status = 400, body = ErrorBody),
        (status = 403, description = "Wrong or missing access code, or an email not on the registered list", body = ErrorBody),
        (status = 409, description = "The email already has a VM and this client is not the one that got it", body = ErrorBody),
        (status = 429, description = "Too many requests from this address (see Retry-After)", body = ErrorBody),
        (status = 503, description = "No VM free", body = ErrorBody)))]
pub async fn request_vm(State(state): State<HttpState>, req: Request) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let form = FormOrJson::from_request(Request::from_parts(parts.clone(), body), &state).await?;
    let taken = take_vm(&state, &parts, &form).await?;
    let granted = taken.granted;
    Ok((
        [(header::SET_COOKIE, taken.cookie)],
        Json(GrantedBody {
            hostname: granted.hostname.to_string(),
            pin: granted.pin.expose().to_owned(),
            newly_assigned: granted.newly_assigned,
        }),
    )
        .into_response())
}

/// Query of [`list_vms`].
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only the VM assigned to this email (to help a participant: release or look it up).
    pub email: Option<String>,
}

/// Every VM, or the one an email holds.
#[utoipa::path(get, path = "/api/v1/vms", tag = "admin", params(ListQuery),
    responses((status = 200, body = [VmView]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)), security(("admin_basic" = [])))]
pub async fn list_vms(
    State(state): State<HttpState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<VmView>>> {
    let email = query
        .email
        .map(|e| e.parse())
        .transpose()
        .map_err(|e: lablink_core::Error| ApiError::bad_request(e.message().to_owned()))?;
    let filter = VmFilter {
        email,
        ..VmFilter::default()
    };
    let vms = state.allocator().vms(&filter).await?;
    Ok(Json(vms.iter().map(VmView::from).collect()))
}

/// One VM (admins, or the VM's own agent).
#[utoipa::path(get, path = "/api/v1/vms/{hostname}", tag = "admin",
    params(("hostname" = String, Path, description = "The VM")),
    responses((status = 200, body = VmView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = []), ("agent_token" = [])))]
pub async fn get_vm(
    State(state): State<HttpState>,
    caller: AdminOrAgent,
    PathText(name): PathText,
) -> ApiResult<Json<VmView>> {
    let hostname = caller.own(&name)?;
    let record = state.allocator().vm(&hostname).await?;
    Ok(Json(VmView::from(&record)))
}

/// A VM's logs (admins, or the VM's own agent).
#[utoipa::path(get, path = "/api/v1/vms/{hostname}/logs", tag = "admin",
    params(("hostname" = String, Path, description = "The VM")),
    responses((status = 200, body = LogsView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = []), ("agent_token" = [])))]
pub async fn vm_logs(
    State(state): State<HttpState>,
    caller: AdminOrAgent,
    PathText(name): PathText,
) -> ApiResult<Json<LogsView>> {
    let hostname = caller.own(&name)?;
    let logs = state.allocator().logs(&hostname).await?;
    Ok(Json(LogsView {
        hostname: hostname.to_string(),
        cloud_init: logs.cloud_init,
        container: logs.container,
        agent: logs.agent,
    }))
}

/// Body of `launch`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LaunchBody {
    /// How many VMs (at least 1).
    pub count: usize,
}

/// Starts launching VMs; the operation runs in the background.
#[utoipa::path(post, path = "/api/v1/launch", tag = "admin", request_body = LaunchBody,
    responses((status = 202, body = OperationView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "Another operation is running", body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn launch(
    State(state): State<HttpState>,
    req: AdminForm,
) -> ApiResult<(StatusCode, Json<OperationView>)> {
    let AdminForm { form, caller, .. } = req;
    let count = form.get("count").and_then(Value::as_u64);
    let what = What::launch(count.and_then(|n| usize::try_from(n).ok()));
    let outcome = async {
        let body: LaunchBody = typed(form)?;
        let options = LaunchOptions { count: body.count };
        Ok::<_, ApiError>(state.allocator().launch(&options).await?)
    }
    .await;
    audit::record(&state, &caller, AuditAction::Launch, what, &outcome).await;
    Ok((StatusCode::ACCEPTED, Json(OperationView::from(&outcome?))))
}

/// Body of `destroy`: either `all: true` or a list of hostnames.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DestroyBody {
    /// Destroy every VM.
    #[serde(default)]
    pub all: bool,
    /// Destroy these VMs.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// With `[collect] destroy_collects_first`: destroy at once, without collecting (for
    /// VMs whose collection failed, e.g. a dead agent).
    #[serde(default)]
    pub force: bool,
}

/// Starts destroying VMs. With `[collect] destroy_collects_first`, first collects from them
/// (waiting up to `destroy_wait_seconds`); VMs whose collection failed are not destroyed,
/// and the answer is then 409 naming them (`blocked`), with the operation destroying the
/// others (`operation`, or null). `force` destroys at once without collecting.
#[utoipa::path(post, path = "/api/v1/destroy", tag = "admin", request_body = DestroyBody,
    responses((status = 202, body = OperationView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn destroy(State(state): State<HttpState>, req: AdminForm) -> ApiResult<Response> {
    let what = What::chosen(&req.form);
    let outcome = destroy_chosen(&state, req.form).await;
    let answered = Answered(&outcome);
    audit::record(&state, &req.caller, AuditAction::Destroy, what, &answered).await;
    outcome.map(|(status, body)| (status, Json(body)).into_response())
}

/// Destroys the VMs `form` chooses: the status and body of the answer.
async fn destroy_chosen(state: &HttpState, form: FormOrJson) -> ApiResult<(StatusCode, Value)> {
    let body: DestroyBody = typed(form)?;
    let target = match (body.all, body.hostnames.is_empty()) {
        (true, true) => DestroyTarget::All,
        (false, false) => DestroyTarget::Hostnames(
            body.hostnames
                .iter()
                .map(|h| {
                    h.parse().map_err(|e: lablink_core::Error| {
                        ApiError::bad_request(e.message().to_owned())
                    })
                })
                .collect::<ApiResult<_>>()?,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "give either \"all\": true or a non-empty \"hostnames\" list",
            ))
        }
    };
    let destroyed = state
        .allocator()
        .destroy_collecting(&target, body.force)
        .await?;
    Ok(crate::http::collect::destroyed_json(&destroyed, |op| {
        serde_json::json!(OperationView::from(op))
    }))
}

/// Starts rebooting a VM.
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/reboot", tag = "admin",
    params(("hostname" = String, Path, description = "The VM")),
    responses((status = 202, body = OperationView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn reboot(
    State(state): State<HttpState>,
    PathText(name): PathText,
    req: AdminForm,
) -> ApiResult<(StatusCode, Json<OperationView>)> {
    let outcome = async {
        let hostname = vm_hostname(&name)?;
        Ok::<_, ApiError>(state.allocator().reboot(&hostname).await?)
    }
    .await;
    let what = What::vm(Some(&name));
    audit::record(&state, &req.caller, AuditAction::Reboot, what, &outcome).await;
    Ok((StatusCode::ACCEPTED, Json(OperationView::from(&outcome?))))
}

/// Ends a VM's assignment; it becomes free again.
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/release", tag = "admin",
    params(("hostname" = String, Path, description = "The VM")),
    responses((status = 200, body = VmView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn release(
    State(state): State<HttpState>,
    PathText(name): PathText,
    req: AdminForm,
) -> ApiResult<Json<VmView>> {
    let outcome = async {
        let hostname = vm_hostname(&name)?;
        Ok::<_, ApiError>(state.allocator().release(&hostname).await?)
    }
    .await;
    let what = What::vm(Some(&name));
    audit::record(&state, &req.caller, AuditAction::Release, what, &outcome).await;
    Ok(Json(VmView::from(&outcome?)))
}

/// Query of `operations`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct OperationsQuery {
    /// How many (newest first; default 20, at most 200).
    pub limit: Option<usize>,
}

/// The newest operations with their progress.
#[utoipa::path(get, path = "/api/v1/operations", tag = "admin", params(OperationsQuery),
    responses((status = 200, body = [OperationView]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn operations(
    State(state): State<HttpState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<OperationsQuery>,
) -> ApiResult<Json<Vec<OperationView>>> {
    let ops = state
        .allocator()
        .operations(q.limit.unwrap_or(20).min(200))
        .await?;
    Ok(Json(ops.iter().map(OperationView::from).collect()))
}

/// One operation.
#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "The operation")),
    responses((status = 200, body = OperationView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn operation(
    State(state): State<HttpState>,
    _admin: Admin,
    PathText(id): PathText,
) -> ApiResult<Json<OperationView>> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad_request("the operation id must be a UUID"))?;
    let op = state.allocator().operation(id).await?;
    Ok(Json(OperationView::from(&op)))
}

/// The pool: counts and the serving settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    /// VMs by state.
    pub counts: CountsView,
    /// Longest a wait is held, in seconds.
    pub max_wait_seconds: f64,
    /// Whether VM routes need tokens (`tokens`) or not (`open`).
    pub agent_auth: String,
}

/// Pool counts and settings.
#[utoipa::path(get, path = "/api/v1/pool", tag = "admin",
    responses((status = 200, body = PoolView), (status = 401, body = ErrorBody)), security(("admin_basic" = [])))]
pub async fn pool(State(state): State<HttpState>, _admin: Admin) -> ApiResult<Json<PoolView>> {
    let counts = state.allocator().counts().await?;
    Ok(Json(PoolView {
        counts,
        max_wait_seconds: state.options().max_wait.as_secs_f64(),
        agent_auth: match state.options().agent_auth {
            AgentAuthMode::Tokens => "tokens".into(),
            AgentAuthMode::Open => "open".into(),
        },
    }))
}
