//! What a handler's payload looks like: a name, a content type and a JSON Schema, for the AsyncAPI
//! document.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

/// A payload as the service's description shows it: its name (the message's name), content type and
/// JSON Schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub(crate) name: Cow<'static, str>,
    pub(crate) content_type: Cow<'static, str>,
    pub(crate) schema: Value,
}

impl Payload {
    /// A payload with a schema of your own (for a custom extractor or codec).
    ///
    /// ```
    /// use ferrostream::asyncapi::Payload;
    /// let csv = Payload::new("OrderCsv", "text/csv", serde_json::json!({ "type": "string" }));
    /// assert_eq!(csv.name(), "OrderCsv");
    /// ```
    pub fn new(name: impl Into<Cow<'static, str>>, content_type: impl Into<Cow<'static, str>>, schema: Value) -> Self {
        Payload {
            name: name.into(),
            content_type: content_type.into(),
            schema,
        }
    }

    /// The message's name: the payload type's (`Order` for `Json<Order>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MIME type, e.g. `application/json`.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The JSON Schema (a `$ref` into `#/components/schemas` for a named type).
    pub fn schema(&self) -> &Value {
        &self.schema
    }
}

/// The schemas of one document, collected while its payloads are described: named types go to
/// `components.schemas`, once each.
pub struct Schemas {
    generator: SchemaGenerator,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas")
            .field("definitions", &self.generator.definitions().len())
            .finish()
    }
}

/// Where named schemas live in an AsyncAPI document.
const DEFINITIONS: &str = "/components/schemas";

impl Schemas {
    pub(crate) fn new() -> Self {
        // AsyncAPI's schema format is a superset of JSON Schema draft 07.
        let mut settings = SchemaSettings::draft07();
        settings.definitions_path = DEFINITIONS.into();
        settings.meta_schema = None;
        Schemas {
            generator: SchemaGenerator::new(settings),
        }
    }

    /// A JSON payload of type `T`, its schema derived with schemars.
    pub fn json<T: JsonSchema + ?Sized>(&mut self) -> Payload {
        let schema = self.generator.subschema_for::<T>().to_value();
        Payload::new(T::schema_name().into_owned(), "application/json", schema)
    }

    /// A UTF-8 text payload (`String`).
    pub fn text(&mut self) -> Payload {
        Payload::new("Text", "text/plain", json!({ "type": "string" }))
    }

    /// Raw bytes (`Bytes`, `Vec<u8>`).
    pub fn bytes(&mut self) -> Payload {
        Payload::new(
            "Bytes",
            "application/octet-stream",
            json!({ "type": "string", "format": "binary" }),
        )
    }

    /// A payload of type `T` in a format without a schema here (a codec's): named after the type, any value.
    pub fn opaque<T: ?Sized>(&mut self, content_type: &'static str) -> Payload {
        Payload::new(short_type_name::<T>(), content_type, json!({}))
    }

    /// The named schemas collected so far.
    pub(crate) fn into_definitions(mut self) -> Map<String, Value> {
        self.generator.take_definitions(true)
    }
}

/// `alloc::vec::Vec<my_crate::Order>` -> `Vec<Order>`: every path without its modules.
fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    for part in full.split_inclusive(|c: char| "<>,;[]()& ".contains(c)) {
        let (path, delimiter) = match part.char_indices().last() {
            Some((i, c)) if "<>,;[]()& ".contains(c) => (&part[..i], &part[i..]),
            _ => (part, ""),
        };
        out.push_str(path.rsplit("::").next().unwrap_or(path));
        out.push_str(delimiter);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Order {
        /// The order's number.
        id: u64,
        lines: Vec<Line>,
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Line {
        sku: String,
    }

    #[test]
    fn a_named_type_is_a_reference_into_the_components_and_its_parts_are_defined_once() {
        let mut s = Schemas::new();
        let p = s.json::<Order>();
        assert_eq!(p.name(), "Order");
        assert_eq!(p.schema(), &json!({ "$ref": "#/components/schemas/Order" }));
        let again = s.json::<Vec<Order>>();
        assert_eq!(again.schema()["items"], json!({ "$ref": "#/components/schemas/Order" }));
        let defs = s.into_definitions();
        assert_eq!(defs.keys().collect::<Vec<_>>(), ["Line", "Order"]);
        assert_eq!(defs["Order"]["properties"]["id"]["description"], "The order's number.");
        assert_eq!(
            defs["Order"]["properties"]["lines"]["items"],
            json!({ "$ref": "#/components/schemas/Line" })
        );
    }

    #[test]
    fn opaque_payloads_are_named_after_their_type() {
        let p = Schemas::new().opaque::<Vec<Order>>("application/msgpack");
        assert_eq!((p.name(), p.content_type()), ("Vec<Order>", "application/msgpack"));
    }
}
