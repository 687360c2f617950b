//! Headers every response carries, as one layer over the whole router: a Content Security
//! Policy that lets pages load only this server's own script, styles and images (the pages
//! have no inline script or style), and refuses framing, MIME sniffing and cross-site
//! referrers.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::Response;

/// What pages may load and who may frame them.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The headers and their values.
const HEADERS: [(HeaderName, &str); 4] = [
    (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "same-origin"),
];

/// Adds the headers to `response` (replacing any a handler set); the router applies it to
/// every response with `axum::middleware::map_response(security_headers::add)`.
pub async fn add(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
