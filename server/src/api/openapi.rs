//! `GET /v1/openapi.json`: the OpenAPI 3.1 description of the API, kept in
//! `docs/openapi.json` and embedded at build time; and the test that keeps
//! it and the route table equal.

use crate::http::Response;

/// `docs/openapi.json`, as it was when the server was built.
pub(super) const DOCUMENT: &str = include_str!("../../../docs/openapi.json");

/// The document, open to anyone (it describes, it grants nothing).
pub(super) fn document() -> Response {
    let mut resp = Response::new(200, "application/json", DOCUMENT.as_bytes().to_vec());
    resp.extra_headers
        .push(("x-content-type-options", "nosniff".to_owned()));
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use miniserde::json::{self, Value};

    use super::super::{Auth, ROUTES};
    use super::*;

    fn object(value: &Value) -> &miniserde::json::Object {
        match value {
            Value::Object(o) => o,
            other => panic!("expected a JSON object, found {other:?}"),
        }
    }

    /// (METHOD, path) of every operation the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: Value = json::from_str(DOCUMENT).expect("docs/openapi.json is not valid JSON");
        let doc = object(&doc);
        assert!(
            matches!(doc.get("openapi"), Some(Value::String(v)) if v.starts_with("3.1")),
            "docs/openapi.json must be OpenAPI 3.1"
        );
        let paths = object(doc.get("paths").expect("docs/openapi.json has no paths"));
        let mut ops = BTreeSet::new();
        for (path, item) in paths.iter() {
            for method in object(item).keys() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    ops.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        ops
    }

    /// (METHOD, path) of every route a client can call by name: all but
    /// the fallbacks and the console's assets (not part of the API).
    fn routed() -> BTreeSet<(String, String)> {
        ROUTES
            .iter()
            .filter(|r| !r.is_fallback() && !r.path.starts_with("/ui"))
            .map(|r| {
                let method = r.method.expect("a listed route has a method");
                (method.to_owned(), r.path.to_owned())
            })
            .collect()
    }

    #[test]
    fn the_document_describes_every_route_and_no_other() {
        let documented = documented();
        let routed = routed();
        let missing: Vec<String> = routed
            .difference(&documented)
            .map(|(m, p)| {
                format!(
                    "  {m} {p}: add \"{p}\": {{\"{}\": {{...}}}} under \"paths\" in docs/openapi.json",
                    m.to_lowercase()
                )
            })
            .collect();
        let extra: Vec<String> = documented
            .difference(&routed)
            .map(|(m, p)| {
                format!(
                    "  {m} {p}: the server has no such route; add it to ROUTES in server/src/api/mod.rs or remove it from docs/openapi.json"
                )
            })
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "docs/openapi.json and the route table (ROUTES in server/src/api/mod.rs) differ:\n{}{}{}",
            if missing.is_empty() {
                String::new()
            } else {
                format!("routes the document lacks:\n{}\n", missing.join("\n"))
            },
            if extra.is_empty() {
                ""
            } else {
                "operations with no route:\n"
            },
            extra.join("\n"),
        );
    }

    #[test]
    fn each_operation_names_how_its_caller_authenticates() {
        let doc: Value = json::from_str(DOCUMENT).unwrap();
        let paths = object(object(&doc).get("paths").unwrap());
        for r in ROUTES
            .iter()
            .filter(|r| !r.is_fallback() && !r.path.starts_with("/ui"))
        {
            let method = r.method.unwrap().to_lowercase();
            let Some(op) = paths.get(r.path).and_then(|item| object(item).get(&method)) else {
                continue; // the test above names it
            };
            let want: &[&str] = match r.auth {
                Auth::Admin(_) => &["adminToken"],
                Auth::Agent(_) => &["agentCertificate"],
                Auth::Open | Auth::Anonymous | Auth::Registration => &[],
            };
            let have: Vec<String> = match object(op).get("security") {
                Some(Value::Array(reqs)) => reqs
                    .iter()
                    .flat_map(|req| object(req).keys().cloned().collect::<Vec<_>>())
                    .collect(),
                _ => Vec::new(),
            };
            assert_eq!(
                have,
                want,
                "{} {}: docs/openapi.json must give it \"security\": {:?}",
                r.method.unwrap(),
                r.path,
                want
            );
        }
    }
}
