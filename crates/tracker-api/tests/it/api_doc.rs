//! docs/api.md against the OpenAPI document the app serves: every operation
//! of `/openapi.json` has its section in docs/api.md, and every endpoint the
//! page documents as existing is served. An endpoint is documented by a
//! heading "### `METHOD /path`"; those under the "Planned, not implemented"
//! section must not be served yet.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use tracker_core::testing::Backend;

use crate::helpers::TestApp;

/// The section of docs/api.md that lists what is not built yet.
const PLANNED: &str = "## Planned, not implemented";

const METHODS: [&str; 7] = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// `METHOD /path`.
type Endpoint = (String, String);

/// The endpoints docs/api.md documents: (existing, planned).
fn documented(page: &str) -> (BTreeSet<Endpoint>, BTreeSet<Endpoint>) {
    let (mut existing, mut planned) = (BTreeSet::new(), BTreeSet::new());
    let mut in_planned = false;
    for line in page.lines() {
        if line.starts_with("## ") {
            in_planned = line.trim_end() == PLANNED;
        }
        let Some(endpoint) = endpoint_heading(line) else {
            continue;
        };
        if in_planned {
            planned.insert(endpoint);
        } else {
            existing.insert(endpoint);
        }
    }
    (existing, planned)
}

/// The endpoint of a heading "### `METHOD /path`", if the line is one.
fn endpoint_heading(line: &str) -> Option<Endpoint> {
    let inner = line.strip_prefix("### `")?.trim_end().strip_suffix('`')?;
    let (method, path) = inner.split_once(' ')?;
    (METHODS.contains(&method) && path.starts_with('/'))
        .then(|| (method.to_owned(), path.to_owned()))
}

/// Every operation of an OpenAPI document.
fn served(doc: &Value) -> BTreeSet<Endpoint> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .map(|(method, _)| method.to_ascii_uppercase())
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(move |m| (m, path.clone()))
        })
        .collect()
}

fn show(set: &BTreeSet<Endpoint>) -> String {
    set.iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn the_page_parser_finds_existing_and_planned_endpoints() {
    let page = "intro\n### `GET /a/{id}`\ntext\n### Not an endpoint\n### `FETCH /x`\n\
                ## Planned, not implemented\n### `PUT /b`\n## After\n### `DELETE /c`\n";
    let (existing, planned) = documented(page);
    let ep = |m: &str, p: &str| (m.to_owned(), p.to_owned());
    assert_eq!(
        existing,
        BTreeSet::from([ep("GET", "/a/{id}"), ep("DELETE", "/c")])
    );
    assert_eq!(planned, BTreeSet::from([ep("PUT", "/b")]));
}

#[tokio::test]
async fn api_md_documents_exactly_the_served_endpoints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md");
    let page =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (existing, planned) = documented(&page);

    let app = TestApp::spawn(Backend::Standalone).await;
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    let served = served(&doc);
    assert!(
        served.len() >= 10,
        "the OpenAPI document lists only {}",
        show(&served)
    );

    let undocumented: BTreeSet<_> = served.difference(&existing).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented in docs/api.md (add a \"### `METHOD /path`\" section): {}",
        show(&undocumented)
    );
    let not_served: BTreeSet<_> = existing.difference(&served).cloned().collect();
    assert!(
        not_served.is_empty(),
        "documented in docs/api.md as existing but not in /openapi.json: {}",
        show(&not_served)
    );
    let built: BTreeSet<_> = planned.intersection(&served).cloned().collect();
    assert!(
        built.is_empty(),
        "served now, but docs/api.md still lists them as planned: {}",
        show(&built)
    );
}
