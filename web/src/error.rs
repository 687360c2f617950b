//! What a failed request answers: a status and a message that says what to do. [`Failure`]
//! renders as JSON (`{"error": …}`) for the API; [`PageFailure`] as an HTML page for browsers.
//! Bad input is always a 4xx; 500 is kept for the server's own faults.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use diskferry_daemon::catalog::CatalogError;
use diskferry_daemon::jobs::JobError;
use diskferry_fs::FsError;

/// A request that could not be served.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<CatalogError> for Failure {
    fn from(e: CatalogError) -> Failure {
        match e {
            CatalogError::Invalid(m) => Failure::bad_request(m),
            e @ CatalogError::HasDependents { .. } => {
                Failure::new(StatusCode::CONFLICT, e.to_string())
            }
            e => Failure::internal(e.to_string()),
        }
    }
}

impl From<JobError> for Failure {
    fn from(e: JobError) -> Failure {
        match e {
            JobError::Invalid(m) => Failure::bad_request(m),
            JobError::NotFound(m) => Failure::not_found(m),
            JobError::Conflict(m) => Failure::new(StatusCode::CONFLICT, m),
            JobError::Catalog(e) => e.into(),
        }
    }
}

impl From<FsError> for Failure {
    fn from(e: FsError) -> Failure {
        let status = match &e {
            FsError::NotFound(_) => StatusCode::NOT_FOUND,
            FsError::NotADirectory(_) | FsError::Escapes(_) => StatusCode::BAD_REQUEST,
            // The capture's filesystem cannot give this: the request is fine, the data is not.
            // A directory loop or a walk past its limits is the data's doing too.
            FsError::Corrupt(..)
            | FsError::Ext4 { .. }
            | FsError::Unsupported(_)
            | FsError::Walk(_) => StatusCode::UNPROCESSABLE_ENTITY,
            FsError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::new(status, e.to_string())
    }
}

impl From<tokio::task::JoinError> for Failure {
    fn from(e: tokio::task::JoinError) -> Failure {
        Failure::internal(format!("a worker failed: {e}"))
    }
}

/// A [`Failure`] shown to a browser as a page.
#[derive(Debug)]
pub struct PageFailure(pub Failure);

impl From<Failure> for PageFailure {
    fn from(f: Failure) -> PageFailure {
        PageFailure(f)
    }
}

impl<E> From<E> for PageFailure
where
    E: Into<Failure> + std::error::Error,
{
    fn from(e: E) -> PageFailure {
        PageFailure(e.into())
    }
}

impl IntoResponse for PageFailure {
    fn into_response(self) -> Response {
        let body = crate::pages::layout::error_page(self.0.status, &self.0.message);
        (self.0.status, Html(body.into_string())).into_response()
    }
}
