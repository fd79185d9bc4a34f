//! The bundled live dashboard: static files from `web/`, embedded in the binary at build time so
//! the page works offline and needs no install step. The page talks to `/ws` and the JSON APIs
//! like any other client, through the JS client library: its committed ES module build
//! (`clients/js/dist/tickfan.js`, checked against its TypeScript source by the node tests) is
//! embedded too, so a fresh clone builds and serves it without Node.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const UPSTREAMS_JS: &str = include_str!("../../web/upstreams.js");
const CLIENT_JS: &str = include_str!("../../clients/js/dist/tickfan.js");
const STYLE: &str = include_str!("../../web/style.css");
const CHARTS: &str = include_str!("../../web/vendor/lightweight-charts.standalone.production.js");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `GET /`
pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /app.js`
pub async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /upstreams.js`: the upstream feeds panel (polls `/health`).
pub async fn upstreams_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", UPSTREAMS_JS)
}

/// `GET /tickfan.js`: the JS client (ES module) the dashboard imports; usable by any page.
pub async fn client_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", CLIENT_JS)
}

/// `GET /style.css`
pub async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /vendor/lightweight-charts.js` (Apache-2.0, see web/vendor/).
pub async fn chart_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", CHARTS)
}
