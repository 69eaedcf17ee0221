//! Server-rendered HTML: minijinja templates embedded at compile time from
//! `src/http/templates/`, auto-escaped.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use minijinja::Environment;
use serde::Serialize;

/// The compiled templates.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        [$(($name, include_str!(concat!("templates/", $name)))),*]
    };
}

impl Templates {
    /// Loads every template (a broken template is a bug caught by the tests).
    pub fn new() -> Self {
        let mut env = Environment::new();
        for (name, source) in templates!(
            "base.html",
            "index.html",
            "result.html",
            "participant_banner.html",
            "login.html",
            "admin.html",
            "admin_nav.html",
            "vm_row.html",
            "supervisor.html",
            "operations.html",
            "collections.html",
            "usage.html",
            "vm.html",
            "confirm.html",
            "message.html",
            "participants.html",
            "settings.html",
            "machines.html",
            "audit.html",
            "desktop.html",
        ) {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("template {name} does not compile: {e}"));
        }
        Self { env }
    }

    /// Renders `name` with `context`, or a plain 500 page if rendering fails.
    pub fn render(&self, name: &str, context: impl Serialize) -> Result<String, minijinja::Error> {
        self.env.get_template(name)?.render(context)
    }

    /// An HTML response with `status`.
    pub fn page(&self, status: StatusCode, name: &str, context: impl Serialize) -> Response {
        match self.render(name, context) {
            Ok(html) => (status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "template failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Html("<h1>Internal error</h1>".to_owned()),
                )
                    .into_response()
            }
        }
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}
