//! The one metrics stack of both binaries: `prometheus-client`, with a
//! registry per application instance (no global recorder), so several
//! instances in one test process count apart.
//!
//! Each binary declares its own metrics (their names stay in its crate, next
//! to what they count) and hands the finished registry to [`crate::ops`],
//! which renders it. Label values come from fixed sets: declare them with
//! [`label_enum!`](crate::label_enum), never from ids or error text.

use std::sync::Arc;

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A finished registry, shared between the code that counts and `/metrics`.
pub type SharedRegistry = Arc<Registry>;

/// The registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Writing into a String cannot fail; if it ever does, a partial
        // scrape is better than none.
        tracing::error!(error = %e, "could not encode metrics");
    }
    out
}

/// Declares a label-value enum: its variants and their exact spelling in the
/// exposition, with `as_str`, `Display` and the label encoding.
///
/// ```
/// tracker_runtime::label_enum!(
///     /// Which way it went.
///     Outcome { Ok => "ok", Failed => "failed" }
/// );
/// assert_eq!(Outcome::Failed.as_str(), "failed");
/// ```
#[macro_export]
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        $crate::label_value!($name);
    };
}

/// Lets a type with `as_str(self) -> &'static str` be a label value.
#[macro_export]
macro_rules! label_value {
    ($($name:ty),+ $(,)?) => {$(
        impl $crate::metrics::prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut $crate::metrics::prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> ::std::fmt::Result {
                ::std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    crate::label_enum!(
        /// A test label.
        Colour { Red => "red", Blue => "blue" }
    );

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        colour: Colour,
    }

    #[test]
    fn label_enums_render_their_spelling() {
        let mut registry = Registry::default();
        let family = Family::<Labels, Counter>::default();
        registry.register("test_things", "things", family.clone());
        family
            .get_or_create(&Labels {
                colour: Colour::Blue,
            })
            .inc();
        let text = render(&registry);
        assert!(
            text.contains("test_things_total{colour=\"blue\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(Colour::Red.to_string(), "red");
    }
}
