//! Property tests of request-body parsing: any bytes, any JSON shape, never
//! a panic, and every refusal is a 400 naming a field.

use proptest::prelude::*;
use serde_json::{json, Value};
use tracker_api::error::ApiError;
use tracker_api::extract::parse_json;
use tracker_api::routes::connections::RegisterRequest;
use tracker_api::routes::heartbeats::BatchRequest;

/// Arbitrary JSON, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![Just("vnc"), Just("http"), Just("websocket")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("protocol".to_owned()),
                    Just("user_id".to_owned()),
                    Just("client_ip".to_owned()),
                    Just("user_agent".to_owned()),
                    Just("connection_id".to_owned()),
                    Just("heartbeats".to_owned()),
                    Just("session_id".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn refused_with_a_field<T>(r: Result<T, ApiError>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) => Ok(()),
        Err(ApiError::InvalidRequest { field, .. }) => {
            prop_assert!(!field.is_empty());
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!("not a 400: {other:?}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_bytes_are_parsed_or_refused_as_400(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        refused_with_a_field(parse_json::<RegisterRequest>(&bytes))?;
        refused_with_a_field(parse_json::<BatchRequest>(&bytes))?;
    }

    #[test]
    fn any_json_is_parsed_or_refused_as_400(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        refused_with_a_field(parse_json::<RegisterRequest>(&bytes))?;
        refused_with_a_field(parse_json::<BatchRequest>(&bytes))?;
    }

    #[test]
    fn well_formed_registrations_parse(
        protocol in prop_oneof![Just("vnc"), Just("http"), Just("websocket")],
        user in "[a-zA-Z0-9@._-]{1,40}",
        ip in any::<std::net::IpAddr>(),
        ua in ".{0,600}",
    ) {
        let body = json!({"protocol": protocol, "user_id": user, "client_ip": ip.to_string(), "user_agent": ua});
        let parsed = parse_json::<RegisterRequest>(&serde_json::to_vec(&body).unwrap());
        prop_assert!(parsed.is_ok(), "{:?}", parsed.err());
    }
}
