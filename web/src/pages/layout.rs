//! The frame every page shares (header, navigation, logout form carrying the CSRF token) and
//! small formatting helpers: query-string encoding, dates, sizes.

use axum::http::StatusCode;
use maud::{html, Markup, DOCTYPE};

use crate::auth::Identity;

/// Percent-encodes a query value, `/` kept readable (paths).
pub fn encode_query(s: &str) -> String {
    crate::client::percent_encode(s, b"/")
}

/// `YYYY-MM-DD HH:MM` UTC from seconds since the epoch.
pub fn date(secs: i64) -> String {
    let full = diskferry_fs::Timestamp { secs, nanos: 0 }.utc_string();
    full[..full.len().saturating_sub(3)].to_string()
}

pub use diskferry_imaging::units::human_bytes;

/// A whole page: `title`, the navigation (with `active` marked) and `body`.
pub fn page(title: &str, active: &str, who: Option<&Identity>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · diskferry" }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/captures" { "diskferry" }
                    @if let Some(who) = who {
                        nav {
                            @for (href, label) in [("/captures", "Captures"), ("/jobs", "Jobs"), ("/machines", "Machines")] {
                                a href=(href) aria-current=[(label == active).then_some("page")] { (label) }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(who.csrf());
                            button type="submit" { "Log out" }
                        }
                        meta name="csrf-token" content=(who.csrf());
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The page shown for a failed request.
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    page(
        status.canonical_reason().unwrap_or("Error"),
        "",
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error { (message) }
            p { a href="/captures" { "Back to the captures" } }
        },
    )
}

/// A horizontal bar of proportional segments: (fraction 0..1, css class, label). Drawn as SVG
/// rectangles placed by attributes, not inline styles, so the Content Security Policy needs no
/// `style-src 'unsafe-inline'`.
pub fn bar(segments: &[(f64, &str, String)]) -> Markup {
    let mut x = 0.0;
    let placed: Vec<(f64, f64, &str, &str)> = segments
        .iter()
        .map(|(frac, class, label)| {
            let width = (frac * 100.0).clamp(0.0, 100.0 - x);
            x += width;
            (x - width, width, *class, label.as_str())
        })
        .collect();
    html! {
        svg.bar role="img" aria-label=(segments.iter().map(|s| s.2.clone()).collect::<Vec<_>>().join(", ")) {
            @for (x, width, class, label) in placed {
                rect class=(format!("seg {class}")) x=(format!("{x:.3}%")) y="0" width=(format!("{width:.3}%")) height="100%" {
                    title { (label) }
                }
            }
        }
    }
}
