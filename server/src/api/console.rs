//! The web console under `/ui/`: three files (HTML, one script, one style
//! sheet) embedded in the binary, served to anyone with a strict
//! Content-Security-Policy. They hold no data: the page asks the admin API
//! for everything with the bearer token the operator types in.

use crate::http::Response;

/// The console's files: (name under `/ui/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/console.css"),
    ),
];

/// Everything from this server, nothing inline, no eval, no framing: a
/// page that shows agents' self-chosen strings must not run them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Adds the headers every answer under `/ui/` carries, refusals included.
pub(super) fn protect(resp: &mut Response) {
    let headers = [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        // Small files, and a new server build must show its own console.
        ("cache-control", "no-cache"),
    ];
    for (name, value) in headers {
        resp.extra_headers.push((name, value.to_owned()));
    }
}

/// The asset at `path` (`/ui/` is the page), or 404.
pub(super) fn asset(path: &str) -> Response {
    let name = match path.strip_prefix("/ui/") {
        Some("") => "index.html",
        Some(name) => name,
        None => "",
    };
    let mut resp = match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => Response::new(200, content_type, bytes.to_vec()),
        None => Response::error(404, format!("the console has no file {path}")),
    };
    protect(&mut resp);
    resp
}

/// `/ui` to `/ui/`, so that the page's relative links resolve.
pub(super) fn redirect() -> Response {
    let mut resp = Response::new(308, "text/plain", b"see /ui/\n".to_vec());
    resp.extra_headers.push(("location", "/ui/".to_owned()));
    protect(&mut resp);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget: the whole console, every file, at most 250 KB.
    const BUDGET: usize = 250 * 1000;

    #[test]
    fn the_console_fits_its_budget() {
        let total: usize = ASSETS.iter().map(|(_, _, bytes)| bytes.len()).sum();
        assert!(
            total <= BUDGET,
            "the console's assets are {total} bytes, over the budget of {BUDGET}"
        );
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let html = std::str::from_utf8(ASSETS[0].2).unwrap();
        let js = std::str::from_utf8(ASSETS[1].2).unwrap();
        // No inline script or style, no handler attributes: the CSP would
        // block them, so the page would break silently.
        assert!(!html.contains("<script>"), "inline script in index.html");
        assert!(!html.contains("<style"), "inline style in index.html");
        assert!(!html.contains(" style="), "style attribute in index.html");
        let handler = html.split(" on").skip(1).any(|rest| {
            rest.split(['=', ' ', '>'])
                .next()
                .is_some_and(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
                && rest
                    .trim_start_matches(char::is_alphabetic)
                    .starts_with('=')
        });
        assert!(!handler, "handler attribute in index.html");
        for file in [html, js] {
            assert!(
                !file.contains("http://") && !file.contains("https://"),
                "the console fetches nothing from elsewhere"
            );
        }
        assert!(!js.contains("eval(") && !js.contains("new Function"));
        assert!(!js.contains("innerHTML"), "text goes in with textContent");
        assert!(!js.contains("document.cookie"), "the token is no cookie");
    }

    #[test]
    fn every_answer_carries_the_policy() {
        for path in [
            "/ui/",
            "/ui/index.html",
            "/ui/console.js",
            "/ui/console.css",
            "/ui/nope",
            "/ui/../ca.key",
        ] {
            let resp = asset(path);
            let header = |name: &str| {
                resp.extra_headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(
                header("content-security-policy"),
                Some(CONTENT_SECURITY_POLICY),
                "{path}"
            );
            assert_eq!(header("x-content-type-options"), Some("nosniff"), "{path}");
        }
        assert_eq!(asset("/ui/nope").status, 404);
        assert_eq!(asset("/ui/../ca.key").status, 404);
        assert_eq!(asset("/ui/").content_type, "text/html; charset=utf-8");
        assert_eq!(redirect().status, 308);
    }
}
