//! Property tests of the validation at the edge: whatever a client sends,
//! parsing never panics and accepts exactly what docs/api.md allows.

use proptest::prelude::*;
use tracker_core::{ConnectionId, SessionId, UserAgent, UserId};

/// The documented rule for session ids (docs/api.md), written independently of the parser.
fn is_kubernetes_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=253).contains(&s.len())
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Mostly the id alphabet, with some uppercase, underscores and odd characters.
    #[test]
    fn session_ids_accept_exactly_kubernetes_names(s in "[a-z0-9.\\-A-Z_ é{}]{0,260}") {
        let parsed = s.parse::<SessionId>();
        prop_assert_eq!(parsed.is_ok(), is_kubernetes_name(&s), "{:?}", s);
        match parsed {
            Ok(id) => prop_assert_eq!(id.as_str(), s.as_str()),
            Err(e) => prop_assert_eq!(e.field, "session_id"),
        }
    }

    #[test]
    fn session_id_parsing_never_panics_on_any_text(s in any::<String>()) {
        let _ = s.parse::<SessionId>();
    }

    #[test]
    fn user_ids_are_printable_and_at_most_255_chars(s in any::<String>()) {
        let expected = (1..=255).contains(&s.chars().count()) && !s.chars().any(char::is_control);
        let parsed = s.parse::<UserId>();
        prop_assert_eq!(parsed.is_ok(), expected);
        if let Err(e) = parsed {
            prop_assert_eq!(e.field, "user_id");
        }
    }

    #[test]
    fn user_agents_keep_the_longest_prefix_that_fits(s in any::<String>()) {
        let ua = UserAgent::truncated(&s);
        let kept = ua.as_str();
        prop_assert!(s.starts_with(kept));
        prop_assert!(kept.len() <= UserAgent::MAX_BYTES);
        if s.len() <= UserAgent::MAX_BYTES {
            prop_assert_eq!(kept, s.as_str());
        } else {
            // Only a partial character (at most 3 bytes) is dropped at the cut.
            prop_assert!(kept.len() > UserAgent::MAX_BYTES - 4);
        }
    }

    #[test]
    fn connection_ids_parse_any_uuid_spelling_to_one_form(bytes in any::<[u8; 16]>(), upper in any::<bool>()) {
        let uuid = uuid::Uuid::from_bytes(bytes);
        let text = if upper { uuid.hyphenated().to_string().to_uppercase() } else { uuid.simple().to_string() };
        let id: ConnectionId = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(id.to_string(), uuid.hyphenated().to_string());
    }

    #[test]
    fn connection_id_parsing_rejects_non_uuids(s in "[^0-9a-fA-F-]{1,40}") {
        prop_assert!(s.parse::<ConnectionId>().is_err());
    }
}
