//! The operator page (`GET /ui`, docs/ui.md): one HTML file, a script and a
//! stylesheet, compiled into the binary so the page works offline and always
//! matches the API it is served with.
//!
//! Loading it needs no token; the page asks for one and reads everything
//! through the JSON API with it, so it can see no more than the token may.
//! Its Content-Security-Policy allows only its own script and stylesheet and
//! requests to this origin: no inline script, no third-party host, no frames.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// What the page may load and where it may send requests: itself only.
/// `img-src data:` is for the empty favicon, which spares a 404 per load.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page and its two assets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(stylesheet))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY_VALUE),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
            // Small, and must change with the binary: revalidate every time.
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/ui", tag = "ui",
    responses((status = 200, description = "The operator page; it asks for a bearer token and reads the JSON API with it",
        content_type = "text/html")))]
pub async fn page() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

#[utoipa::path(get, path = "/ui/app.js", tag = "ui",
    responses((status = 200, description = "The operator page's script", content_type = "text/javascript")))]
pub async fn script() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

#[utoipa::path(get, path = "/ui/app.css", tag = "ui",
    responses((status = 200, description = "The operator page's stylesheet", content_type = "text/css")))]
pub async fn stylesheet() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // No inline script or style: the policy would block them.
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("style="));
        assert!(INDEX_HTML.contains(r#"src="ui/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="ui/app.css""#));
        // Nothing from another host; the SVG namespace is a name, not a load.
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn")
            );
        }
    }

    #[test]
    fn the_token_never_goes_to_a_cookie_or_local_storage() {
        assert!(!APP_JS.contains("document.cookie"));
        assert!(!APP_JS.contains("localStorage"));
        assert!(APP_JS.contains("sessionStorage"));
    }
}
