//! The REST control plane (`pg_hardstorage serve`) lands with the API issue;
//! it will call the same `pg_hardstorage_repo` functions the CLI calls. What
//! exists now is the piece both share with the CLI: how a coded problem
//! becomes the contract's HTTP status and error body.
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::event::SCHEMA;
use pg_hardstorage_engine::Problem;
use serde_json::{json, Value};

/// The HTTP status and `{schema, error}` body for a problem.
pub fn error_response(p: &Problem) -> (u16, Value) {
    (
        p.http_status(),
        json!({"schema": SCHEMA, "error": p.to_json()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_refusal_is_412_with_suggestion() {
        let p = Problem::new("restore.target_not_empty", "target /x is not empty")
            .with("target", "/x")
            .suggest("Restore into an empty directory", None);
        let (status, body) = error_response(&p);
        assert_eq!(status, 412);
        assert_eq!(body["schema"], "pg_hardstorage.v1");
        assert_eq!(body["error"]["code"], "restore.target_not_empty");
        assert_eq!(body["error"]["subject"]["target"], "/x");
        assert!(body["error"]["suggestion"]["doc_url"].as_str().is_some());
    }
}
